"""Reading a located hit straight out of a same-host node's memory tier.

A locating lookup (``lookup(..., locate=True)``) answers, with each hit, where every
entry's payload lies in the node's arena and every slab's checksum; the client maps the
arena once (the "shm" transport). :class:`ArenaReader` then copies any layer range of one
kind of the hit's entries into the caller's buffer, a few strided copies per entry and no
request to the node: the request path is one lookup, not a lookup and fetches.

Without a lease the node may evict an entry and reuse its memory before the copy. Every
slab is verified after it is copied, against the checksum the lookup returned, so such a
slab is a miss (the reader recomputes from there), never data.
"""

from __future__ import annotations

import itertools
import mmap
import os
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from numpy.lib.stride_tricks import as_strided

from cachesvc.wire.keys import FamilySpec, Kind
from cachesvc.wire.layout import Layout
from cachesvc_client.codec import Hit


VERIFIERS = min(8, os.cpu_count() or 1)
"""Threads that verify spans in place for :meth:`ArenaReader.verify_leading`."""
_POOL: list[ThreadPoolExecutor] = []


def _verifiers() -> ThreadPoolExecutor:
    """The process's verifying threads, started on first use and kept (concurrent.futures
    joins them at exit; idle, they cost nothing)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(VERIFIERS, thread_name_prefix="cachesvc-verify"))
    return _POOL[0]


def _l2_bytes(cpu: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """One core's level-2 cache in bytes, as Linux's sysfs gives it (None elsewhere)."""
    for index in sorted(cpu.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2" and \
                    (index / "type").read_text().strip() in ("Unified", "Data"):
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            return None
    return None


GROUP_BYTES = max(64 << 10, (_l2_bytes() or 1 << 20) // 2)
"""Bytes copied in one piece before they are hashed: half a core's L2 cache, so that a
group's source and copy both stay in it and the hash reads the copy from there. With
1 MiB groups on the AMD VM (1 MiB of L2) a 47 MB read ran at 12.1-12.5 GB/s, with 512 KiB
at 13.7-15.1 (memcpy 19.4-21.2; docs/results.md, 2026-12-08). 512 KiB where sysfs does
not say."""


@dataclass(frozen=True, slots=True)
class Span:
    """Layers [start, start + layers) of one kind of one entry: contiguous in the arena
    (an entry's payload is kind-major, layers ascending), one slab of ``size`` bytes per
    layer, each with the checksum the lookup gave."""

    arena_offset: int
    size: int
    checksums: tuple[int, ...]

    @property
    def layers(self) -> int:
        return len(self.checksums)


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)   # <linux/mman.h>; Python < 3.13 lacks the name
# Per mapping of a node's memory tier, the pages this process has mapped (populate skips
# them). Weak: a mapping a client dropped (a restarted node) takes its bitmap with it.
_MAPPED: "weakref.WeakKeyDictionary[mmap.mmap, np.ndarray]" = weakref.WeakKeyDictionary()


def map_pages(arena: mmap.mmap, start: int, stop: int) -> bool:
    """Map the pages of ``arena`` bytes [start, stop) into this process's page tables
    (``MADV_POPULATE_READ``), skipping what this process mapped before; False where the
    kernel cannot (older than 5.14). On a node's memory tier call it only for pages the
    node allocated (committed entries, or extents it reported): a read-populate of a
    hole in shared memory allocates the page. ~85 ms per GiB on this VM; releases the GIL."""
    page = mmap.PAGESIZE
    mapped = _MAPPED.get(arena)
    if mapped is None:
        mapped = _MAPPED[arena] = np.zeros(-(-len(arena) // page), dtype=bool)
    first, last = start // page, -(-min(len(arena), stop) // page)
    if mapped[first:last].all():
        return True
    try:
        arena.madvise(MADV_POPULATE_READ, first * page, (last - first) * page)
    except (OSError, ValueError):
        return False
    mapped[first:last] = True
    return True


class ArenaReader:
    """Copies slabs of ``hit`` (which must carry locations) out of ``arena``. Entries are
    laid back to back along tokens in the destination, as the data plane's are."""

    def __init__(self, arena: mmap.mmap, family: FamilySpec, hit: Hit) -> None:
        if hit.locations is None:
            raise ValueError("the hit was not located (lookup with locate=True)")
        self.arena, self.family, self.hit = arena, family, hit
        # (layout, kind, layer) -> its place in the payload: layouts are interned and a hit
        # has one or two (full chunks, a partial one), so this is computed a few times.
        self._places: dict[tuple[int, Kind, int], tuple[int, int, int] | None] = {}

    def populate(self) -> None:
        """Map the hit's entries into this process's page tables in one call
        (``MADV_POPULATE_READ``, Linux 5.14+; a no-op elsewhere). A process that did not
        write an entry otherwise takes a page fault per 4 KiB on first reading it: measured
        123 ms against 18 ms (populate 11 + copy 7) for 8 entries of 2048 tokens × 30 layers
        of K/V (94 MB) on this VM. Pages this process mapped before (here or by
        :func:`map_pages`) are skipped. Only located, committed entries are touched, so no
        page of the node's memory tier is allocated by it."""
        assert self.hit.locations is not None
        for layout, location in zip(self.hit.layouts, self.hit.locations, strict=True):
            if location.arena_offset < 0:
                break
            if not map_pages(self.arena, location.arena_offset,
                             location.arena_offset + layout.payload_bytes(self.family)):
                return   # an older kernel: pages fault in on first read instead

    @property
    def in_memory(self) -> int:
        """How many leading entries lie in the memory tier (the rest only on disk)."""
        assert self.hit.locations is not None
        for i, location in enumerate(self.hit.locations):
            if location.arena_offset < 0:
                return i
        return self.hit.num_chunks

    def spans(self, kind: Kind, start: int, stop: int, entries: int) -> list[Span]:
        """The spans of (kind, start..stop-1) of the leading entries, up to ``entries``;
        fewer where an entry lacks one of these layers, lies only on disk or would reach
        past the arena (no entry after it is usable either)."""
        assert self.hit.locations is not None
        out: list[Span] = []
        for layout, location in zip(self.hit.layouts[:entries], self.hit.locations[:entries], strict=True):
            first, last = self._place(layout, kind, start), self._place(layout, kind, stop - 1)
            if first is None or last is None or last[0] - first[0] != stop - start - 1 or location.arena_offset < 0:
                break
            index, offset, size = first
            begin = location.arena_offset + offset
            if begin + (stop - start) * size > len(self.arena):
                break
            out.append(Span(begin, size, location.checksums[index:index + stop - start]))
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
        verified (the rest of ``out`` is not data).

        Each entry's span is one strided copy (``copy_and_digest``); one layer of entries
        laid out alike is copied a group at a time (:meth:`_read_layer`)."""
        position, spans = 0, self.spans(kind, start, stop, entries)
        if stop - start == 1:
            return self._read_layer(spans, out[0])
        for i, span in enumerate(spans):
            block = out[:, position:position + span.size]
            if copy_and_digest(self.arena, span.arena_offset, block) != list(span.checksums):
                return i
            position += span.size
        return len(spans)

    def _read_layer(self, spans: Sequence[Span], row: np.ndarray) -> int:
        """One slab per span into ``row`` (uint8, back to back); the number of leading
        spans verified. Consecutive spans equally far apart in the arena with slabs of one
        size (the entries of one put are) are copied by one strided copy of up to
        GROUP_BYTES and hashed after it, where a copy per slab costs more in Python than
        in bytes: 5.6 against 6.3 ms for SmolLM2's 2048 tokens of K and V read layer by
        layer on the AMD VM (96 KiB slabs; docs/results.md, 2026-12-07 night)."""
        done = position = 0
        for group in _strided_groups(spans, GROUP_BYTES):
            first, size = group[0].arena_offset, group[0].size
            stride = group[1].arena_offset - first if len(group) > 1 else size
            block = row[position:position + len(group) * size].reshape(len(group), size)
            for digest, span in zip(copy_and_digest(self.arena, first, block, stride), group, strict=True):
                if digest != span.checksums[0]:
                    return done
                done += 1
            position += len(group) * size
        return done

    def verify_leading(self, spans: Sequence[Span]) -> int:
        """How many leading ``spans`` verify in place (:meth:`verify`), hashed in parallel
        by up to VERIFIERS threads: xxhash releases the GIL on large buffers, and on a
        GPU host one core's hashing (15-25 GB/s here) would hold back a host-to-device
        copy of ~50 GB/s that many cores and the host's bandwidth can keep up with. Every
        span is hashed, also after a failing one."""
        if len(spans) < 2:
            return len(list(itertools.takewhile(self.verify, spans)))
        verified = list(_verifiers().map(self.verify, spans))
        return next((i for i, ok in enumerate(verified) if not ok), len(spans))

    def verify(self, span: Span) -> bool:
        """Whether the arena bytes of ``span`` hash to its checksums now, read in place
        (meaningful only while the entry is held, e.g. by a lease: else they may change
        after). For copies the reader does not make itself, e.g. a DMA to a GPU."""
        return all(self.verify_slab(span, j) for j in range(span.layers))

    def verify_slab(self, span: Span, j: int) -> bool:
        """:meth:`verify` of the ``j``-th slab of ``span`` alone (layer start + j)."""
        at = span.arena_offset + j * span.size
        return xxhash.xxh3_64_intdigest(np.frombuffer(self.arena, np.uint8, span.size, at)) == span.checksums[j]

    def _place(self, layout: Layout, kind: Kind, layer: int) -> tuple[int, int, int] | None:
        key = (id(layout), kind, layer)
        if key not in self._places:
            self._places[key] = layout.place(self.family, kind, layer)
        return self._places[key]


def copy_rows(dest: np.ndarray, source: np.ndarray) -> None:
    """``dest[...] = source`` (uint8 rows of equal shape) through numpy's vectorized
    ufunc loop (``source | 0``), not ``memmove``. Rows of the memory tier lie in a memfd
    mapping with 4 KiB pages (shmem gets no huge pages where
    ``transparent_hugepage/shmem_enabled`` is ``never``), and numpy asks for huge pages
    for its large arrays. From the first into the second, glibc's ``memmove`` ran at
    half speed on the AMD EPYC VM, 4.5-6.6 against 9.2-11.4 GB/s for 96 KiB rows, in one
    piece or strided. Into torch's buffers (4 KiB pages) the two ran alike within this
    VM's spread, 7.3-10 GB/s (docs/results.md, 2026-12-07 evening). So the loop is the
    one to take: the SDK's own outputs and a caller's numpy arrays get its speed."""
    np.bitwise_or(source, 0, out=dest)


def _strided_groups(spans: Sequence[Span], limit: int) -> Iterator[list[Span]]:
    """``spans`` (one slab each) in order, cut into runs that one strided view of the
    arena covers: slabs of one size, equally far apart (at least a slab), ``limit``
    bytes at most (one slab at least)."""
    group: list[Span] = []
    for span in spans:
        if group:
            stride = span.arena_offset - group[-1].arena_offset
            if (span.size != group[0].size or stride < span.size or (len(group) + 1) * span.size > limit
                    or (len(group) > 1 and stride != group[1].arena_offset - group[0].arena_offset)):
                yield group
                group = []
        group.append(span)
    if group:
        yield group


def copy_and_digest(arena: mmap.mmap, offset: int, block: np.ndarray, stride: int = 0) -> list[int]:
    """Copy the arena slabs at ``offset``, ``stride`` bytes apart (0: back to back), into
    ``block`` (uint8 ``[slabs, slab bytes]``, rows strided through the caller's buffer)
    in groups of about GROUP_BYTES, hashing each group right after, while it is still in
    cache; the rows' xxh3-64 digests, taken from the copies (what the caller will use).
    0.8-0.9x memcpy on the Intel VM, against 0.55x slab by slab (docs/results.md).
    Hashing a group while a second thread copies the next won at most 10% on these
    2-core VMs: xxhash releases the GIL on large buffers (two threads hashing 2 MiB each
    in cache took 1.02x one), but the cores share the memory bandwidth (two threads
    hashing from memory took twice as long as one). The copy is :func:`copy_rows`."""
    rows, size = block.shape
    if rows == 1:   # one slab: no grouping, a few us of Python less
        row = block[0]
        copy_rows(row, np.frombuffer(arena, np.uint8, size, offset))
        return [xxhash.xxh3_64_intdigest(row)]
    stride = stride or size
    source = as_strided(np.frombuffer(arena, np.uint8, (rows - 1) * stride + size, offset), (rows, size),
                        (stride, 1), writeable=False)
    step = max(1, GROUP_BYTES // max(size, 1))
    digests: list[int] = []
    for a in range(0, rows, step):
        b = min(a + step, rows)
        copy_rows(block[a:b], source[a:b])
        digests += [xxhash.xxh3_64_intdigest(row) for row in block[a:b]]
    return digests
