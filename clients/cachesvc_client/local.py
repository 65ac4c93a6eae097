"""Reading a located hit straight out of a same-host node's memory tier.

A locating lookup (``lookup(..., locate=True)``) answers, with each hit, where every
entry's payload lies in the node's arena and every slab's checksum; the client maps the
arena once (the "shm" transport). :class:`ArenaReader` then copies any (kind, layer) of
the hit's entries into the caller's buffer with one memcpy per entry and no request to
the node: the request path is one lookup, not a lookup and fetches.

Without a lease the node may evict an entry and reuse its memory before the copy. Every
slab is verified after it is copied, against the checksum the lookup returned, so such a
slab is a miss (the reader recomputes from there), never data.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import xxhash

from cachesvc.wire.keys import FamilySpec, Kind
from cachesvc.wire.layout import Layout
from cachesvc_client.codec import Hit


GROUP_BYTES = 1 << 20
"""Bytes copied before they are hashed: small enough to be hashed from cache."""


@dataclass(frozen=True, slots=True)
class SlabSource:
    """Where one slab of one entry lies in the arena, and what it must hash to."""

    arena_offset: int
    size: int
    checksum: int


class ArenaReader:
    """Copies slabs of ``hit`` (which must carry locations) out of ``arena``. Entries are
    laid back to back along tokens in the destination, as the data plane's are."""

    def __init__(self, arena: mmap.mmap, family: FamilySpec, hit: Hit) -> None:
        if hit.locations is None:
            raise ValueError("the hit was not located (lookup with locate=True)")
        self.arena, self.family, self.hit = arena, family, hit
        self.bytes_copied = 0
        # (layout, kind, layer) -> its place in the payload: layouts are interned and a hit
        # has one or two (full chunks, a partial one), so this is computed a few times.
        self._places: dict[tuple[int, Kind, int], tuple[int, int, int] | None] = {}

    @property
    def in_memory(self) -> int:
        """How many leading entries lie in the memory tier (the rest only on disk)."""
        assert self.hit.locations is not None
        for i, location in enumerate(self.hit.locations):
            if location.arena_offset < 0:
                return i
        return self.hit.num_chunks

    def sources(self, kind: Kind, layer: int, entries: int) -> list[SlabSource | None]:
        """Slab (kind, layer) of the first ``entries`` entries; None where an entry does not
        hold it or lies outside the memory tier."""
        assert self.hit.locations is not None
        out: list[SlabSource | None] = []
        for layout, location in zip(self.hit.layouts[:entries], self.hit.locations[:entries], strict=True):
            place = self._place(layout, kind, layer)
            if place is None or location.arena_offset < 0:
                out.append(None)
                continue
            index, offset, size = place
            start = location.arena_offset + offset
            out.append(SlabSource(start, size, location.checksums[index])
                       if start + size <= len(self.arena) else None)
        return out

    def read(self, kind: Kind, layer: int, out: np.ndarray, entries: int) -> int:
        """Copy slab (kind, layer) of the first ``entries`` entries into ``out`` (uint8,
        their bytes back to back); the number of leading entries that arrived whole and
        verified (the rest of ``out`` is not data)."""
        return self.read_range(kind, layer, layer + 1, out.reshape(1, -1), entries)

    def read_range(self, kind: Kind, start: int, stop: int, out: np.ndarray, entries: int) -> int:
        """Copy slabs (kind, start..stop-1) of the first ``entries`` entries into ``out``
        (uint8 ``[stop - start, bytes of one layer]``, each row the entries' bytes back to
        back), verifying every slab; the number of leading entries that arrived whole and
        verified. An entry's consecutive layers of one kind are consecutive in its payload,
        so they are copied by strided copies of about GROUP_BYTES each and hashed while
        still in cache: 0.8-0.9x memcpy here, against 0.55x slab by slab (docs/results.md).
        (Hashing a group while a second thread copies the next was slower still: xxhash
        holds the GIL, and the hand-offs cost more than the overlap gained.)"""
        assert self.hit.locations is not None
        position, layers = 0, stop - start
        for i, (layout, location) in enumerate(zip(self.hit.layouts[:entries], self.hit.locations[:entries],
                                                   strict=True)):
            first, last = self._place(layout, kind, start), self._place(layout, kind, stop - 1)
            if first is None or last is None or last[0] - first[0] != layers - 1 or location.arena_offset < 0:
                return i   # the entry lacks one of these layers (or lies only on disk)
            index, offset, size = first
            begin = location.arena_offset + offset
            if begin + layers * size > len(self.arena):
                return i
            group = max(1, GROUP_BYTES // size)
            for a in range(0, layers, group):
                b = min(a + group, layers)
                dest = out[a:b, position:position + size]
                np.copyto(dest, np.frombuffer(self.arena, np.uint8, (b - a) * size, begin + a * size)
                          .reshape(b - a, size))
                self.bytes_copied += (b - a) * size
                for j in range(b - a):
                    if xxhash.xxh3_64_intdigest(dest[j]) != location.checksums[index + a + j]:
                        return i
            position += size
        return entries

    def _place(self, layout: Layout, kind: Kind, layer: int) -> tuple[int, int, int] | None:
        key = (id(layout), kind, layer)
        if key not in self._places:
            self._places[key] = layout.place(self.family, kind, layer)
        return self._places[key]

    def verify(self, source: SlabSource) -> bool:
        """Whether the arena bytes of ``source`` hash to its checksum now (meaningful only
        while the entry is held, e.g. by a lease: otherwise they may change after)."""
        view = np.frombuffer(self.arena, np.uint8, source.size, source.arena_offset)
        return xxhash.xxh3_64_intdigest(view) == source.checksum
