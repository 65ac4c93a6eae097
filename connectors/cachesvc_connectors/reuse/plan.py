"""Reuse plans (DroidSpeak): which contiguous layer groups a consumer recomputes.

A plan over ``num_layers`` layers is a sorted tuple of disjoint half-open groups
``[start, end)``. Outside every group the consumer uses the producer's K/V unchanged;
for a group it loads the producer's hidden state entering ``start`` (E) and runs its own
layers ``start .. end-1`` over the cached prefix. The empty plan is full reuse; the plan
``((0, num_layers),)`` recomputes everything from the producer's E at layer 0, which is
the embedding output and therefore the consumer's own full prefill.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cachesvc.wire.keys import Kind


@dataclass(frozen=True, slots=True)
class Plan:
    """Invariant: groups sorted, disjoint, non-empty, inside [0, num_layers)."""

    num_layers: int
    groups: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        end = 0
        for start, stop in self.groups:
            if not end <= start < stop <= self.num_layers:
                raise ValueError(f"plan groups must be sorted, disjoint and inside [0, "
                                 f"{self.num_layers}); got {self.describe()}")
            end = stop

    @classmethod
    def full_reuse(cls, num_layers: int) -> Plan:
        return cls(num_layers)

    @classmethod
    def recompute_all(cls, num_layers: int) -> Plan:
        return cls(num_layers, ((0, num_layers),))

    @classmethod
    def parse(cls, text: str, num_layers: int) -> Plan:
        """``"[20,26)"`` or ``"20-26,28-30"`` (half-open); ``""`` or ``"none"`` = full reuse."""
        text = text.strip()
        if text in ("", "none", "[]"):
            return cls(num_layers)
        groups = re.findall(r"\[?\s*(\d+)\s*[,-]\s*(\d+)\s*\)?", text)
        if not groups:
            raise ValueError(f"not a plan: {text!r} (example: '[20,26)' or '20-26,28-30')")
        return cls(num_layers, tuple((int(a), int(b)) for a, b in groups))

    @property
    def recomputed_layers(self) -> int:
        return sum(stop - start for start, stop in self.groups)

    @property
    def group_starts(self) -> tuple[int, ...]:
        return tuple(start for start, _ in self.groups)

    def group_at(self, layer: int) -> tuple[int, int] | None:
        for start, stop in self.groups:
            if start <= layer < stop:
                return start, stop
        return None

    def reused_ranges(self) -> list[tuple[int, int]]:
        """The layer ranges whose K/V come from the producer, in layer order."""
        out, at = [], 0
        for start, stop in (*self.groups, (self.num_layers, self.num_layers)):
            if at < start:
                out.append((at, start))
            at = stop
        return out

    def needs(self) -> dict[Kind, tuple[int, ...]]:
        """Slabs this plan reads from the producer, by kind."""
        reused = tuple(layer for a, b in self.reused_ranges() for layer in range(a, b))
        return {Kind.K: reused, Kind.V: reused, Kind.E: self.group_starts}

    def describe(self) -> str:
        if not self.groups:
            return "full reuse"
        return ",".join(f"[{a},{b})" for a, b in self.groups)


def blend_shares(ratio: float) -> tuple[float, float]:
    """CacheBlend-style selective recompute (cachesvc_lab.blend) at ``ratio``: the shares of the
    cached tokens recomputed at layer 1 and at every layer after it (layer 0 recomputes
    all). Gradual filtering: twice the ratio first, then the ratio."""
    return min(1.0, 2 * ratio), ratio
