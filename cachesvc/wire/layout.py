"""Which layers of each kind an entry holds: the one layout record both the node (index,
disk tier) and the SDK (lookup answers) use."""

from __future__ import annotations

from dataclasses import dataclass

from cachesvc.wire.keys import Kind


@dataclass(frozen=True, slots=True)
class Layout:
    """Which layers of each kind an entry holds; interned, many entries share one."""

    num_tokens: int
    k_layers: tuple[int, ...]
    v_layers: tuple[int, ...]
    e_layers: tuple[int, ...]

    def layers(self, kind: Kind) -> tuple[int, ...]:
        return (self.k_layers, self.v_layers, self.e_layers)[kind - 1]


_LAYOUTS: dict[Layout, Layout] = {}


def intern_layout(layout: Layout) -> Layout:
    return _LAYOUTS.setdefault(layout, layout)
