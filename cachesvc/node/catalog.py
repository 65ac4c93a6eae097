"""The catalog of committed entries: records by id, the chunk index lookups walk, and the
LRU order of each tier. Part of the store (cachesvc.node.store), which owns the lock.

Not thread-safe: every method runs under the store lock, held by the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachesvc.node.arena import Arena
from cachesvc.node.disk import DiskTier
from cachesvc.node.entries import EntryMeta
from cachesvc.wire.keys import EntryId, Tier

_MEMORY, _DISK = Tier.MEMORY, Tier.DISK   # module globals: EntryRecord.tier is on the lookup path


@dataclass(slots=True)
class EntryRecord:
    """Mutable state of a committed entry. Guarded by the store lock."""

    meta: EntryMeta
    mem_offset: int | None = None   # extent in the arena, None when not in memory
    disk_bytes: int = 0             # > 0 when a whole file is on disk
    readers: int = 0                # reads and spills in progress
    pins: int = 0                   # leases holding it
    deleted: bool = False           # out of the index; freed when readers and pins are 0

    @property
    def busy(self) -> bool:
        return self.readers > 0 or self.pins > 0

    @property
    def tier(self) -> Tier:
        return _MEMORY if self.mem_offset is not None else _DISK


class Catalog:
    """Invariants: a record is in ``entries`` iff it is indexed for lookups; it is in
    ``mem_lru`` iff ``mem_offset`` is set and in ``disk_lru`` iff ``disk_bytes > 0``;
    ``disk_used`` is the sum of ``disk_bytes`` plus writes reserved in flight. A deleted
    record is out of every map but keeps its storage until nobody holds it."""

    def __init__(self, arena: Arena, disk: DiskTier | None, counters: dict[str, int]) -> None:
        self.arena, self.disk, self.counters = arena, disk, counters
        self.entries: dict[EntryId, EntryRecord] = {}
        # (tenant, family) -> chunk hash -> producer -> records, newest last (a producer
        # has several only when it wrote one chunk at several position offsets)
        self.chunks: dict[tuple[str, str], dict[bytes, dict[str, list[EntryRecord]]]] = {}
        # (tenant, family) -> parent hash -> producer -> partial chunks put with that parent
        self.partials: dict[tuple[str, str], dict[bytes, dict[str, list[EntryRecord]]]] = {}
        self.mem_lru: OrderedDict[EntryId, EntryRecord] = OrderedDict()   # oldest first
        self.disk_lru: OrderedDict[EntryId, EntryRecord] = OrderedDict()
        self.disk_used = 0
        self.disk_used_by: dict[str, int] = {}   # the same per tenant
        # Told of every record entering and leaving ``entries`` (the cluster's global
        # index follows it); called under the store lock, so they must only queue.
        self.on_index: Callable[[EntryMeta, Tier], None] | None = None
        self.on_unindex: Callable[[EntryMeta], None] | None = None

    # ------------------------------------------------------------ finding

    def owned(self, entry_ids: Sequence[bytes], tenant: str, family_id: str) -> list[EntryRecord | None]:
        """The records of ``entry_ids`` in order, None where absent or another tenant's or
        family's."""
        recs = (self.entries.get(EntryId(bytes(e))) for e in entry_ids)
        return [r if r is not None and r.meta.tenant == tenant and r.meta.family_id == family_id else None
                for r in recs]

    def of_chunks(self, tenant: str, family_id: str, chunk_hashes: Sequence[bytes],
                  producer: str = "") -> list[EntryRecord]:
        """Every record of these chunks (of ``producer`` only, if given)."""
        by_hash = self.chunks.get((tenant, family_id), {})
        return [r for h in chunk_hashes for p, recs in by_hash.get(bytes(h), {}).items()
                if not producer or p == producer for r in recs]

    def longest_runs(self, tenant: str, family_id: str, hashes: Sequence[bytes],
                     only: set[str], tails: Sequence[bytes] = ()) -> dict[str, list[EntryRecord]]:
        """For each producer of chunk 0, walk the chain while it has the next chunk; a
        producer that holds every chunk gets the first of ``tails`` it holds appended.
        O(producers × (hit length + tails)) dict probes; this is the lookup hot path."""
        by_hash = self.chunks.get((tenant, family_id))
        if not by_hash:
            return {}
        runs: dict[str, list[EntryRecord]] = {}
        for producer, recs in by_hash.get(bytes(hashes[0]), {}).items() if hashes else ():
            if only and producer not in only:
                continue
            run = [recs[-1]]
            for h in hashes[1:]:
                step = by_hash.get(h)
                if step is None:
                    break
                newest = step.get(producer)
                if not newest:
                    break
                run.append(newest[-1])
            runs[producer] = run
        if tails:
            _append_tails(by_hash, runs, len(hashes), tails, only)
        return runs

    def tails(self, tenant: str, family_id: str, parent: bytes, producer: str, limit: int = 32) -> list[EntryRecord]:
        """The partial chunks ``producer`` stored after ``parent`` (the newest record per
        chunk hash), longest first, at most ``limit``."""
        recs = self.partials.get((tenant, family_id), {}).get(bytes(parent), {}).get(producer, ())
        newest = {r.meta.chunk_hash: r for r in recs}
        return sorted(newest.values(), key=lambda r: -r.meta.num_tokens)[:limit]

    def tail_producers(self, tenant: str, family_id: str, parent: bytes) -> list[str]:
        return list(self.partials.get((tenant, family_id), {}).get(bytes(parent), {}))

    def page(self, tenant: str, family_id: str, producer: str, after_hex: str,
             limit: int) -> tuple[list[EntryRecord], bool]:
        """Up to ``limit`` matching records after ``after_hex`` in entry-id order, and
        whether more follow."""
        rows = sorted((r for r in self.entries.values()
                       if (not tenant or r.meta.tenant == tenant)
                       and (not family_id or r.meta.family_id == family_id)
                       and (not producer or r.meta.producer == producer)
                       and r.meta.entry_id.hex() > after_hex),
                      key=lambda r: r.meta.entry_id)
        return rows[:limit], len(rows) > limit

    # ------------------------------------------------------------ adding

    def add_in_memory(self, rec: EntryRecord) -> None:
        """Publish a committed entry, replacing an older one with the same id."""
        old = self.entries.get(rec.meta.entry_id)
        if old is not None:   # same key, other slabs: the new one replaces it
            self.delete(old)
            self.drop_disk(old)   # its file path is the new entry's
        self.entries[rec.meta.entry_id] = rec
        self.index(rec)
        self.mem_lru[rec.meta.entry_id] = rec

    def touch(self, rec: EntryRecord) -> None:
        """A use of ``rec``: a read, or a put of what it already holds. The memory tier
        evicts it after every entry used less recently."""
        # A deleted record keeps its memory until its readers are done, but is in no LRU.
        if rec.mem_offset is not None and rec.meta.entry_id in self.mem_lru:
            self.mem_lru.move_to_end(rec.meta.entry_id)

    def add_on_disk(self, rec: EntryRecord) -> None:
        """An entry found on disk at start."""
        self.entries[rec.meta.entry_id] = rec
        self.index(rec)
        self.disk_lru[rec.meta.entry_id] = rec
        self.charge_disk(rec.meta.tenant, rec.disk_bytes)

    def index(self, rec: EntryRecord) -> None:
        meta = rec.meta
        for table, key in _tables(self, meta):
            table.setdefault((meta.tenant, meta.family_id), {}).setdefault(key, {}) \
                .setdefault(meta.producer, []).append(rec)
        if self.on_index is not None:
            self.on_index(meta, rec.tier)

    def unindex(self, rec: EntryRecord) -> None:
        """Remove from lookups (the record stays reachable by its holders)."""
        meta = rec.meta
        if self.entries.get(meta.entry_id) is rec:
            del self.entries[meta.entry_id]
            if self.on_unindex is not None:
                self.on_unindex(meta)
        for table, key in _tables(self, meta):
            by_key = table.get((meta.tenant, meta.family_id), {})
            producers = by_key.get(key, {})
            recs = producers.get(meta.producer, [])
            if rec in recs:
                recs.remove(rec)
                if not recs:
                    del producers[meta.producer]
                    if not producers:
                        del by_key[key]

    # ------------------------------------------------------------ removing

    def delete(self, rec: EntryRecord) -> None:
        rec.deleted = True
        self.unindex(rec)
        self.release(rec)

    def release(self, rec: EntryRecord) -> None:
        """Free a deleted record's storage once nobody holds it."""
        if not rec.deleted or rec.busy:
            return
        if rec.mem_offset is not None:
            self.arena.free(rec.mem_offset)
            rec.mem_offset = None
            _pop_if(self.mem_lru, rec)
        self.drop_disk(rec)

    def drop_memory(self, rec: EntryRecord) -> None:
        """Evict from memory; out of lookups too unless a disk copy remains."""
        assert rec.mem_offset is not None and not rec.busy
        self.arena.free(rec.mem_offset)
        rec.mem_offset = None
        _pop_if(self.mem_lru, rec)
        self.counters["mem_evictions"] += 1
        if not rec.disk_bytes:
            self.unindex(rec)

    def drop_disk(self, rec: EntryRecord) -> None:
        """Forget rec's disk copy; delete the file unless a successor with the same id
        (a re-put) owns that path now."""
        if not rec.disk_bytes:
            return
        _pop_if(self.disk_lru, rec)
        self.charge_disk(rec.meta.tenant, -rec.disk_bytes)
        rec.disk_bytes = 0
        successor = self.entries.get(rec.meta.entry_id)
        if successor is None or successor is rec:
            assert self.disk is not None
            self.disk.remove(rec.meta.entry_id)

    def charge_disk(self, tenant: str, delta: int) -> None:
        self.disk_used += delta
        self.disk_used_by[tenant] = self.disk_used_by.get(tenant, 0) + delta

    def evict_disk(self, need: int, capacity: int, tenant: str = "", limit: int = 0) -> bool:
        """Make room for ``need`` more bytes on disk, within ``tenant``'s ``limit`` too
        (its own entries go first); False if it cannot."""
        if need > capacity or (limit and need > limit):
            return False
        if limit:
            self._evict(lambda: self.disk_used_by.get(tenant, 0) + need <= limit, tenant)
            if self.disk_used_by.get(tenant, 0) + need > limit:
                return False
        self._evict(lambda: self.disk_used + need <= capacity)
        return self.disk_used + need <= capacity

    def _evict(self, enough, tenant: str | None = None) -> None:
        for rec in list(self.disk_lru.values()):
            if enough():
                return
            if rec.busy or (tenant is not None and rec.meta.tenant != tenant):
                continue
            self.drop_disk(rec)
            self.counters["disk_evictions"] += 1
            if rec.mem_offset is None:
                self.unindex(rec)


def _tables(catalog: Catalog, meta: EntryMeta):
    """The indexes ``meta`` belongs in, with its key in each: the chunk index by its hash,
    and a partial chunk with a parent also the partial index by that parent."""
    yield catalog.chunks, meta.chunk_hash
    if meta.parent_hash:
        yield catalog.partials, meta.parent_hash


def _append_tails(by_hash: dict[bytes, dict[str, list[EntryRecord]]], runs: dict[str, list[EntryRecord]],
                  full: int, tails: Sequence[bytes], only: set[str]) -> None:
    """Append to each run of ``full`` chunks (every producer's, when ``full`` is 0) the
    first of ``tails`` (longest first) its producer holds."""
    extended: set[str] = set()
    for tail in tails:
        for producer, recs in by_hash.get(bytes(tail), {}).items():
            if producer in extended or (only and producer not in only) or len(runs.get(producer, ())) != full:
                continue
            runs.setdefault(producer, []).append(recs[-1])
            extended.add(producer)


def _pop_if(lru: OrderedDict[EntryId, EntryRecord], rec: EntryRecord) -> None:
    """Remove rec from an id-keyed map only if it is rec (not a re-put successor)."""
    if lru.get(rec.meta.entry_id) is rec:
        del lru[rec.meta.entry_id]
