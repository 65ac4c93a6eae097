"""Which layers of each kind an entry holds: the one layout record both the node (index,
disk tier) and the SDK (lookup answers) use."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from cachesvc.wire.keys import FamilySpec, Kind


@dataclass(frozen=True, slots=True)
class Layout:
    """Which layers of each kind an entry holds; interned, many entries share one."""

    num_tokens: int
    k_layers: tuple[int, ...]
    v_layers: tuple[int, ...]
    e_layers: tuple[int, ...]

    def layers(self, kind: Kind) -> tuple[int, ...]:
        return (self.k_layers, self.v_layers, self.e_layers)[kind - 1]

    @property
    def num_slabs(self) -> int:
        return len(self.k_layers) + len(self.v_layers) + len(self.e_layers)

    def payload_bytes(self, family: FamilySpec) -> int:
        """Bytes of an entry's payload: every slab it holds, back to back."""
        return sum(len(self.layers(kind)) * family.slab_bytes(kind, self.num_tokens)
                   for kind in (Kind.K, Kind.V, Kind.E))

    def place(self, family: FamilySpec, kind: Kind, layer: int) -> tuple[int, int, int] | None:
        """Where slab (kind, layer) sits in an entry's payload: (its index in payload
        order, byte offset, size), or None if the entry does not hold it. The payload is
        the slabs back to back, kind-major (K, V, E), layers ascending: the node lays
        entries out so (cachesvc.node.entries), readers of its memory tier rely on it."""
        layers = self.layers(kind)
        at = bisect.bisect_left(layers, layer)
        if at == len(layers) or layers[at] != layer:
            return None
        index = offset = 0
        for before in (Kind.K, Kind.V, Kind.E)[:kind - 1]:
            count = len(self.layers(before))
            index += count
            offset += count * family.slab_bytes(before, self.num_tokens)
        size = family.slab_bytes(kind, self.num_tokens)
        return index + at, offset + at * size, size


_LAYOUTS: dict[Layout, Layout] = {}


def intern_layout(layout: Layout) -> Layout:
    return _LAYOUTS.setdefault(layout, layout)
