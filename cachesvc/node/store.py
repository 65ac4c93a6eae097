"""The cache store: the domain service behind the gRPC servicer (it knows nothing of gRPC).

It owns the entry index, the memory tier (an :class:`Arena`), the disk tier, open
reservations of the two-phase put, and leases.

Concurrency: one ``_lock`` guards every mutable structure; payload bytes are copied
outside it, protected by state instead: a reservation's extent is only touched under the
reservation's own ``lock`` (so abort cannot free it under a writer), and a committed
entry's bytes are only freed when ``readers == 0 and pins == 0``. Lock order is
reservation lock → store lock; the store lock is never held while taking a reservation
lock, doing disk I/O or copying payload.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from cachesvc.node.arena import Arena
from cachesvc.node.disk import DiskTier
from cachesvc.node.entries import EntryMeta, plan_entry, split_run
from cachesvc.wire.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from cachesvc.wire.keys import (DEFAULT_TENANT, ENTRY_ID_BYTES, EntryId, FamilyId, FamilySpec, Kind,
                           check_chunk_hashes)
from cachesvc.node.models import ModelRecord, ModelRegistry, Registration
from cachesvc.node.profiles import ProfileRecord, ProfileRegistry
from cachesvc.node.records import (DiskMode, EntryInput, LookupResult, ProducerHit, ReadHandle,
                              ReadRun, Reservation, StoreConfig, Tier)

log = logging.getLogger(__name__)

MAX_LEASE_TTL_S = 3600
_MEMORY, _DISK = Tier.MEMORY, Tier.DISK   # module globals: _Record.tier is on the lookup path
MAX_TENANT_CHARS = 128


@dataclass(slots=True)
class _Record:
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


@dataclass(slots=True)
class _ReadTally:
    """What one read delivered; added to the counters once, when the read ends (taking
    the store lock once per run would put it on the data plane's hot path)."""

    slabs: int = 0
    size_bytes: int = 0


@dataclass(slots=True)
class _Pending:
    meta: EntryMeta
    mem_offset: int | None          # None when already_present
    received: int = 0               # bytes written so far, in order


@dataclass(slots=True)
class _Reservation:
    reservation_id: str
    ttl_s: float
    deadline: float                 # time.monotonic() after which the reaper aborts it
    pending: list[_Pending]
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False            # committed or aborted; guarded by lock


@dataclass(slots=True)
class _Lease:
    records: list[_Record]     # the records pinned (not ids: an id can be re-put meanwhile)
    deadline: float


class CacheStore:
    """See the module docstring for the locking rules."""

    def __init__(self, config: StoreConfig, node_id: str = "local") -> None:
        self.config = config
        self.node_id = node_id
        self._lock = threading.Lock()
        self._arena = Arena(config.memory_capacity_bytes, config.memory_prefault)
        disk_on = config.disk_mode != DiskMode.OFF
        if disk_on and config.disk_dir is None:
            raise ValueError("disk_dir is required when the disk tier is on")
        self._disk = DiskTier(config.disk_dir, config.disk_fsync) if disk_on else None
        models_path = Path(config.disk_dir) / "models.json" if disk_on else None
        self.models = ModelRegistry(models_path)
        self.profiles = ProfileRegistry(self.models, Path(config.disk_dir) / "profiles.json" if disk_on else None)
        self._entries: dict[EntryId, _Record] = {}
        # (tenant, family) -> chunk hash -> producer -> records, newest last (a producer
        # has several only when it wrote one chunk at several position offsets)
        self._chunks: dict[tuple[str, str], dict[bytes, dict[str, list[_Record]]]] = {}
        self._mem_lru: OrderedDict[EntryId, _Record] = OrderedDict()   # oldest first
        self._disk_lru: OrderedDict[EntryId, _Record] = OrderedDict()
        self._disk_used = 0
        self._reservations: dict[str, _Reservation] = {}
        self._leases: dict[str, _Lease] = {}
        self.counters: dict[str, int] = dict.fromkeys((
            "lookups", "lookup_chunks", "hit_chunks", "puts_committed", "entries_committed",
            "puts_aborted", "reservations_expired", "leases_expired", "slabs_read",
            "bytes_read", "bytes_written", "checksum_failures", "mem_evictions",
            "disk_evictions", "disk_writes", "disk_write_errors", "entries_deleted"), 0)
        self.started_at = time.time()
        self._stop = threading.Event()
        self._persist_q: queue.Queue[EntryId | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        if self._disk is not None:
            self._load_disk()

    @property
    def arena(self) -> Arena:
        """The memory tier's arena (the same-host data plane shares its memfd)."""
        return self._arena

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the reaper (expiry of reservations and leases) and the disk writer."""
        self._threads.append(threading.Thread(target=self._reap_loop, name="reaper", daemon=True))
        if self.config.disk_mode == DiskMode.WRITE_THROUGH:
            self._threads.append(threading.Thread(target=self._persist_loop, name="persister",
                                                  daemon=True))
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop background work; make every committed memory entry durable if the disk
        tier is on (drain the write-through queue, or spill in spill mode)."""
        self._stop.set()
        self._persist_q.put(None)
        for thread in self._threads:
            thread.join()
        if self._disk is not None:
            with self._lock:
                dirty = [r.meta.entry_id for r in self._mem_lru.values() if not r.disk_bytes]
            for entry in dirty:
                self._persist(entry)
        self._arena.close()

    # ------------------------------------------------------------ models

    def register_model(self, model_id: str, weights_digest: str, family: FamilySpec,
                       replace: bool) -> Registration:
        with self._lock:
            reg = self.models.register(model_id, weights_digest, family, replace)
            if reg.replaced is not None:
                doomed = [r for r in self._entries.values() if r.meta.producer == model_id]
                for rec in doomed:
                    self._delete_locked(rec)
                log.info("model replaced", extra={"model_id": model_id, "entries_dropped": len(doomed)})
            return reg

    def get_model(self, model_id: str) -> ModelRecord:
        with self._lock:
            return self.models.get(model_id)

    def list_models(self) -> list[ModelRecord]:
        with self._lock:
            return self.models.models()

    # ------------------------------------------------------------ reuse profiles

    def put_profile(self, producer: str, consumer: str, producer_digest: str, consumer_digest: str,
                    document: bytes) -> ProfileRecord:
        with self._lock:
            return self.profiles.put(producer, consumer, producer_digest, consumer_digest, document)

    def get_profile(self, producer: str, consumer: str) -> ProfileRecord:
        with self._lock:
            return self.profiles.get(producer, consumer)

    def flag_profile(self, producer: str, consumer: str, version: int, reason: str) -> tuple[bool, int]:
        with self._lock:
            return self.profiles.flag(producer, consumer, version, reason)

    def list_profiles(self, producer: str = "", consumer: str = "") -> list[tuple[ProfileRecord, bool]]:
        """Matching profiles with their staleness."""
        with self._lock:
            return [(rec, self.profiles.stale(rec)) for rec in self.profiles.list(producer, consumer)]

    # ------------------------------------------------------------ two-phase put

    def reserve(self, tenant: str, family_id: str, producer: str, entries: Sequence[EntryInput],
                ttl_s: int = 0) -> Reservation:
        tenant = _tenant(tenant)
        _check_ttl(ttl_s, allow_zero=True)
        with self._lock:
            family = self.models.family(family_id)
            model = self.models.get(producer)
        if model.family_id != family_id:
            raise FailedPrecondition(f"producer {producer!r} is of family {model.family_id}, "
                                     f"not {family_id}")
        if not entries:
            raise InvalidArgument("a reservation needs at least one entry")
        metas = [plan_entry(i, tenant, FamilyId(family_id), family, producer, e.chunk_hash,
                            e.position_offset, e.num_tokens, e.slabs, self.config.chunk_size)
                 for i, e in enumerate(entries)]
        ids = [m.entry_id for m in metas]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("the same (chunk_hash, position_offset) appears twice")
        with self._lock:
            present = [self._entries.get(m.entry_id) is not None and
                       self._entries[m.entry_id].meta == m for m in metas]
        need = sum(m.size_bytes for m, p in zip(metas, present, strict=True) if not p)
        if need > self._arena.capacity_bytes:
            raise ResourceExhausted(f"reservation needs {need} bytes, memory tier capacity is "
                                    f"{self._arena.capacity_bytes} bytes: split the put")
        pending: list[_Pending] = []
        try:
            for meta, is_present in zip(metas, present, strict=True):
                offset = None if is_present else self._allocate(meta.size_bytes)
                pending.append(_Pending(meta, offset))
        except ResourceExhausted:
            self._free_pending(pending)
            raise
        ttl = float(ttl_s) if ttl_s else self.config.reservation_ttl_s
        res = _Reservation(secrets.token_hex(12), ttl, time.monotonic() + ttl, pending)
        with self._lock:
            self._reservations[res.reservation_id] = res
        return Reservation(res.reservation_id, metas, present, ttl)

    def write(self, reservation_id: str, entry_index: int, offset: int, data: memoryview) -> int:
        """Copy one in-order piece of an entry's payload; returns bytes received so far."""
        def copy(dest: memoryview) -> None:
            dest[:] = data
        return self.write_from(reservation_id, entry_index, offset, len(data), copy)

    def write_from(self, reservation_id: str, entry_index: int, offset: int, size: int,
                   fill: Callable[[memoryview], None]) -> int:
        """Let ``fill`` put the next ``size`` bytes of an entry's payload straight into the
        memory tier (a socket's ``recv_into``, a copy). If ``fill`` raises, nothing of it
        counts and the error propagates (the caller aborts). Returns bytes received."""
        res = self._reservation(reservation_id)
        with res.lock:
            if res.closed:
                raise FailedPrecondition(f"reservation {reservation_id} is already closed")
            if not 0 <= entry_index < len(res.pending):
                raise InvalidArgument(f"entry_index {entry_index} out of range: reservation "
                                      f"has {len(res.pending)} entries")
            p = res.pending[entry_index]
            if p.mem_offset is None:
                raise FailedPrecondition(f"entry {entry_index} is already present: nothing to write")
            if offset != p.received:
                raise InvalidArgument(f"entry {entry_index}: write at offset {offset} but "
                                      f"{p.received} bytes received so far (writes go in order)")
            end = offset + size
            if end > p.meta.size_bytes:
                raise InvalidArgument(f"entry {entry_index}: write of {size} bytes at "
                                      f"{offset} overruns the entry's {p.meta.size_bytes} bytes")
            base = p.mem_offset
            fill(self._arena.view[base + offset:base + end])
            p.received = end
            res.deadline = time.monotonic() + res.ttl_s
        with self._lock:
            self.counters["bytes_written"] += size
        return end

    def commit(self, reservation_id: str) -> int:
        """Verify and publish every entry of the reservation at once; returns how many
        entries became visible. A checksum mismatch aborts the whole reservation."""
        res = self._reservation(reservation_id)
        with res.lock:
            if res.closed:
                raise FailedPrecondition(f"reservation {reservation_id} is already closed")
            for i, p in enumerate(res.pending):
                if p.mem_offset is not None and p.received != p.meta.size_bytes:
                    raise FailedPrecondition(f"entry {i} has {p.received} of "
                                             f"{p.meta.size_bytes} bytes: write the rest first")
            bad = self._first_bad_slab(res.pending)
            if bad:
                self._close_reservation(res, "puts_aborted")
                raise InvalidArgument(f"{bad}; reservation {reservation_id} aborted")
            committed = self._publish(res)
        if self.config.disk_mode == DiskMode.WRITE_THROUGH:
            for entry in committed:
                self._persist_q.put(entry)
        return len(committed)

    def abort(self, reservation_id: str) -> None:
        res = self._reservation(reservation_id)
        with res.lock:
            if not res.closed:
                self._close_reservation(res, "puts_aborted")

    def _reservation(self, reservation_id: str) -> _Reservation:
        with self._lock:
            res = self._reservations.get(reservation_id)
        if res is None:
            raise NotFound(f"reservation {reservation_id!r} does not exist "
                           "(never made, committed, aborted or expired)")
        return res

    def _first_bad_slab(self, pending: list[_Pending]) -> str:
        view = self._arena.view
        for i, p in enumerate(pending):
            if p.mem_offset is None:
                continue
            for slab in p.meta.slabs:
                start = p.mem_offset + slab.offset
                got = xxhash.xxh3_64_intdigest(view[start:start + slab.size_bytes])
                if got != slab.checksum:
                    return (f"entry {i} slab {slab.kind.name} layer {slab.layer}: checksum "
                            f"{got:016x} does not match the declared {slab.checksum:016x}")
        return ""

    def _publish(self, res: _Reservation) -> list[EntryId]:
        """Under res.lock: make the entries visible. Returns those that need persisting."""
        committed: list[EntryId] = []
        with self._lock:
            for p in res.pending:
                if p.mem_offset is None:
                    continue
                old = self._entries.get(p.meta.entry_id)
                if old is not None:   # same key, other slabs: the new one replaces it
                    self._delete_locked(old)
                    self._drop_disk_locked(old)   # its file path is the new entry's
                rec = _Record(p.meta, p.mem_offset)
                p.mem_offset = None     # ownership moves to the record
                self._entries[p.meta.entry_id] = rec
                self._index_locked(rec)
                self._mem_lru[p.meta.entry_id] = rec
                committed.append(p.meta.entry_id)
            res.closed = True
            self._reservations.pop(res.reservation_id, None)
            self.counters["puts_committed"] += 1
            self.counters["entries_committed"] += len(committed)
        return committed

    def _close_reservation(self, res: _Reservation, counter: str) -> None:
        """Under res.lock: abort, returning its memory."""
        res.closed = True
        self._free_pending(res.pending)
        with self._lock:
            self._reservations.pop(res.reservation_id, None)
            self.counters[counter] += 1

    def _free_pending(self, pending: list[_Pending]) -> None:
        with self._lock:
            for p in pending:
                if p.mem_offset is not None:
                    self._arena.free(p.mem_offset)
                    p.mem_offset = None

    # ------------------------------------------------------------ memory management

    def _allocate(self, size_bytes: int) -> int:
        """An arena extent, evicting (and spilling) LRU entries that nobody holds."""
        while True:
            with self._lock:
                offset = self._arena.alloc(size_bytes)
                if offset is not None:
                    return offset
                victim = next((r for r in self._mem_lru.values() if not r.busy), None)
                if victim is None:
                    raise ResourceExhausted(
                        f"memory tier full: no room for {size_bytes} bytes and every entry is "
                        f"pinned, being read or reserved ({self._arena.used_bytes} of "
                        f"{self._arena.capacity_bytes} bytes used)")
                spill = self.config.disk_mode == DiskMode.SPILL and not victim.disk_bytes
                if not spill:
                    self._drop_memory_locked(victim)
                    continue
            if not self._persist(victim.meta.entry_id):   # outside the lock
                with self._lock:   # could not spill (disk full or failing): drop it
                    if victim.mem_offset is not None and not victim.busy and not victim.disk_bytes:
                        self._drop_memory_locked(victim)

    def _drop_memory_locked(self, rec: _Record) -> None:
        assert rec.mem_offset is not None and not rec.busy
        self._arena.free(rec.mem_offset)
        rec.mem_offset = None
        _pop_if(self._mem_lru, rec)
        self.counters["mem_evictions"] += 1
        if not rec.disk_bytes:
            self._unindex_locked(rec)

    def _index_locked(self, rec: _Record) -> None:
        meta = rec.meta
        by_hash = self._chunks.setdefault((meta.tenant, meta.family_id), {})
        by_hash.setdefault(meta.chunk_hash, {}).setdefault(meta.producer, []).append(rec)

    def _unindex_locked(self, rec: _Record) -> None:
        """Remove from lookups (the record stays reachable by its holders)."""
        meta = rec.meta
        if self._entries.get(meta.entry_id) is rec:
            del self._entries[meta.entry_id]
        by_hash = self._chunks.get((meta.tenant, meta.family_id), {})
        producers = by_hash.get(meta.chunk_hash, {})
        recs = producers.get(meta.producer, [])
        if rec in recs:
            recs.remove(rec)
            if not recs:
                del producers[meta.producer]
                if not producers:
                    del by_hash[meta.chunk_hash]

    def _delete_locked(self, rec: _Record) -> None:
        rec.deleted = True
        self._unindex_locked(rec)
        self._release_locked(rec)

    def _release_locked(self, rec: _Record) -> None:
        """Free a deleted record's storage once nobody holds it."""
        if not rec.deleted or rec.busy:
            return
        if rec.mem_offset is not None:
            self._arena.free(rec.mem_offset)
            rec.mem_offset = None
            _pop_if(self._mem_lru, rec)
        self._drop_disk_locked(rec)

    def _drop_disk_locked(self, rec: _Record) -> None:
        """Forget rec's disk copy; delete the file unless a successor with the same id
        (a re-put) owns that path now."""
        if not rec.disk_bytes:
            return
        _pop_if(self._disk_lru, rec)
        self._disk_used -= rec.disk_bytes
        rec.disk_bytes = 0
        successor = self._entries.get(rec.meta.entry_id)
        if successor is None or successor is rec:
            assert self._disk is not None
            self._disk.remove(rec.meta.entry_id)

    # ------------------------------------------------------------ disk tier

    def _load_disk(self) -> None:
        assert self._disk is not None
        scan = self._disk.scan()
        kept = 0
        for meta in scan.entries:
            try:
                model = self.models.get(meta.producer)
            except NotFound:
                model = None
            if model is None or model.family_id != meta.family_id:
                log.warning("dropping entry of unknown producer",
                            extra={"entry": meta.entry_id.hex(), "producer": meta.producer})
                self._disk.remove(meta.entry_id)
                continue
            rec = _Record(meta, disk_bytes=self._disk.file_bytes(meta))
            self._entries[meta.entry_id] = rec
            self._index_locked(rec)
            self._disk_lru[meta.entry_id] = rec
            self._disk_used += rec.disk_bytes
            kept += 1
        self._evict_disk_locked(0)
        log.info("disk tier loaded", extra={"entries": kept, "dropped_torn": len(scan.dropped),
                                            "bytes": self._disk_used})

    def _persist(self, entry: EntryId) -> bool:
        """Write one memory entry to disk (call without the lock). True if it is on disk
        afterwards, or no longer needs to be (gone or deleted)."""
        assert self._disk is not None
        with self._lock:
            rec = self._entries.get(entry)
            if rec is None or rec.deleted or rec.mem_offset is None or rec.disk_bytes:
                return True
            need = self._disk.file_bytes(rec.meta)
            if not self._evict_disk_locked(need):
                return False
            self._disk_used += need        # reserved before writing: capacity holds
            rec.readers += 1
        ok = True
        try:
            start = rec.mem_offset
            self._disk.write(rec.meta, self._arena.view[start:start + rec.meta.size_bytes])
        except OSError as exc:
            ok = False
            log.error("disk write failed", extra={"entry": entry.hex(), "error": str(exc)})
        with self._lock:
            rec.readers -= 1
            if ok:
                rec.disk_bytes = need
                self._disk_lru[entry] = rec
                self.counters["disk_writes"] += 1
            else:
                self._disk_used -= need
                self.counters["disk_write_errors"] += 1
            self._release_locked(rec)
        return ok

    def _evict_disk_locked(self, need: int) -> bool:
        """Make room for ``need`` more bytes on disk; False if it cannot."""
        capacity = self.config.disk_capacity_bytes
        if need > capacity:
            return False
        for rec in list(self._disk_lru.values()):
            if self._disk_used + need <= capacity:
                break
            if rec.busy:
                continue
            self._drop_disk_locked(rec)
            self.counters["disk_evictions"] += 1
            if rec.mem_offset is None:
                self._unindex_locked(rec)
        return self._disk_used + need <= capacity

    def _persist_loop(self) -> None:
        while True:
            entry = self._persist_q.get()
            if entry is None:
                return
            self._persist(entry)

    # ------------------------------------------------------------ lookup

    def lookup(self, tenant: str, family_id: str, chunk_hashes: Sequence[bytes], consumer: str = "",
               producers: Sequence[str] = (), lease_ttl_s: int = 0) -> LookupResult:
        """Per producer, the longest run of leading chunks it has entries for."""
        tenant = _tenant(tenant)
        try:
            check_chunk_hashes(chunk_hashes)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        _check_ttl(lease_ttl_s, allow_zero=True)
        with self._lock:
            self.models.family(family_id)
            if consumer:
                model = self.models.get(consumer)
                if model.family_id != family_id:
                    raise FailedPrecondition(f"consumer {consumer!r} is of family "
                                             f"{model.family_id}, not {family_id}: its cache "
                                             "cannot be shared")
            runs = self._longest_runs_locked(tenant, family_id, chunk_hashes, set(producers))
            hits = [ProducerHit(p, p == consumer, [r.meta for r in recs], [r.tier for r in recs])
                    for p, recs in sorted(runs.items(), key=lambda kv: -len(kv[1]))]
            lease_id = ""
            if lease_ttl_s and hits:
                lease_id = self._pin_locked([r for recs in runs.values() for r in recs], lease_ttl_s)
            self.counters["lookups"] += 1
            self.counters["lookup_chunks"] += len(chunk_hashes)
            self.counters["hit_chunks"] += max((len(r) for r in runs.values()), default=0)
        return LookupResult(hits, lease_id)

    def _longest_runs_locked(self, tenant: str, family_id: str, hashes: Sequence[bytes],
                             only: set[str]) -> dict[str, list[_Record]]:
        """For each producer of chunk 0, walk the chain while it has the next chunk.
        O(producers × hit length) dict probes; this is the lookup hot path."""
        by_hash = self._chunks.get((tenant, family_id))
        if not by_hash or not hashes:
            return {}
        runs: dict[str, list[_Record]] = {}
        for producer, recs in by_hash.get(bytes(hashes[0]), {}).items():
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
        return runs

    # ------------------------------------------------------------ read

    def read(self, tenant: str, family_id: str, entry_ids: Sequence[bytes], kinds: Sequence[Kind],
             layer_start: int, layer_end: int, layer_major: bool = False) -> "ReadHandle":
        """Runs of the requested slabs. Every entry is held (never freed or evicted) until
        the handle is closed, however far it was iterated: use it as a context manager.
        Validation happens here, so errors surface before any run. Order: entry, kind,
        layer runs; or, with
        ``layer_major``, one slab per run in (layer, entry, kind) order, so a reader can
        use layer l as soon as it has arrived."""
        tenant = _tenant(tenant)
        with self._lock:
            family = self.models.family(family_id)
        end = layer_end or family.num_layers
        if not 0 <= layer_start < end <= family.num_layers:
            raise InvalidArgument(f"layer range [{layer_start}, {end}) is not inside "
                                  f"[0, {family.num_layers})")
        if not kinds or any(k not in (Kind.K, Kind.V, Kind.E) for k in kinds):
            raise InvalidArgument(f"kinds must be a non-empty list of K, V, E; got {list(kinds)}")
        for i, e in enumerate(entry_ids):
            if len(e) != ENTRY_ID_BYTES:
                raise InvalidArgument(f"entry_ids[{i}] has {len(e)} bytes, expected {ENTRY_ID_BYTES}")
        with self._lock:
            recs = [self._entries.get(EntryId(bytes(e))) for e in entry_ids]
            recs = [r if r is not None and r.meta.tenant == tenant and r.meta.family_id == family_id
                    else None for r in recs]
            for r in recs:
                if r is not None:
                    r.readers += 1
                    if r.mem_offset is not None:
                        self._mem_lru.move_to_end(r.meta.entry_id)
        tally = _ReadTally()
        return ReadHandle(self._read_runs(recs, kinds, layer_start, end, layer_major, tally),
                          lambda: self._end_read(recs, tally))

    def _read_runs(self, recs: list[_Record | None], kinds: Sequence[Kind], start: int,
                   end: int, layer_major: bool, tally: _ReadTally) -> Iterator[ReadRun]:
        if layer_major:
            order = ((index, rec, kind, layer, layer + 1) for layer in range(start, end)
                     for index, rec in enumerate(recs) for kind in kinds)
        else:
            order = ((index, rec, kind, start, end)
                     for index, rec in enumerate(recs) for kind in kinds)
        for index, rec, kind, a, b in order:
            if rec is None:
                yield ReadRun(index, kind, a, b - a, missing_reason="entry not found")
                continue
            for run in self._entry_runs(index, rec, kind, a, b):
                if not run.missing_reason:
                    tally.slabs += run.num_layers
                    tally.size_bytes += len(run.data)
                yield run

    def _end_read(self, recs: list[_Record | None], tally: _ReadTally) -> None:
        with self._lock:
            self.counters["slabs_read"] += tally.slabs
            self.counters["bytes_read"] += tally.size_bytes
            for rec in recs:
                if rec is not None:
                    rec.readers -= 1
                    self._release_locked(rec)

    def _entry_runs(self, index: int, rec: _Record, kind: Kind, start: int,
                    end: int) -> Iterator[ReadRun]:
        layer = start
        for run in rec.meta.slab_run(kind, start, end):
            if run[0].layer > layer:
                yield ReadRun(index, kind, layer, run[0].layer - layer,
                              missing_reason=f"{kind.name} not stored for these layers")
            for piece in split_run(run, self.config.max_run_bytes):
                out = self._run_bytes(index, rec, kind, piece)
                yield out
                if out.missing_reason:
                    return
            layer = run[-1].layer + 1
        if layer < end:
            yield ReadRun(index, kind, layer, end - layer,
                          missing_reason=f"{kind.name} not stored for these layers")

    def _run_bytes(self, index: int, rec: _Record, kind: Kind, run: list) -> ReadRun:
        first, size = run[0], sum(s.size_bytes for s in run)
        checksums = tuple(s.checksum for s in run)
        if rec.mem_offset is not None:
            start = rec.mem_offset + first.offset
            data = self._arena.view[start:start + size]   # valid while the read holds rec
            arena_offset = start
        else:
            arena_offset = -1
            try:
                assert self._disk is not None
                data = self._disk.read(rec.meta, first.offset, size)
            except OSError as exc:
                return ReadRun(index, kind, first.layer, len(run), missing_reason=f"disk: {exc}")
            pos = 0
            for slab in run:   # disk is where bytes rot: verify before sending
                if xxhash.xxh3_64_intdigest(data[pos:pos + slab.size_bytes]) != slab.checksum:
                    self._quarantine(rec)
                    return ReadRun(index, kind, first.layer, len(run),
                                   missing_reason="checksum mismatch on disk; entry dropped")
                pos += slab.size_bytes
        return ReadRun(index, kind, first.layer, len(run), checksums, data, "", arena_offset)

    def _quarantine(self, rec: _Record) -> None:
        log.error("checksum failure on disk", extra={"entry": rec.meta.entry_id.hex()})
        with self._lock:
            self.counters["checksum_failures"] += 1
            if not rec.deleted:
                self._delete_locked(rec)

    # ------------------------------------------------------------ delete, pin, list, stats

    def delete(self, tenant: str, family_id: str, entry_ids: Sequence[bytes],
               chunk_hashes: Sequence[bytes], producer: str = "") -> int:
        tenant = _tenant(tenant)
        try:
            check_chunk_hashes(chunk_hashes)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        with self._lock:
            self.models.family(family_id)
            doomed = {id(r): r for r in (self._entries.get(EntryId(bytes(e))) for e in entry_ids)
                      if r is not None and r.meta.tenant == tenant and r.meta.family_id == family_id}
            by_hash = self._chunks.get((tenant, family_id), {})
            for h in chunk_hashes:
                for p, recs in by_hash.get(bytes(h), {}).items():
                    if not producer or p == producer:
                        doomed.update((id(r), r) for r in recs)
            for rec in doomed.values():
                self._delete_locked(rec)
            self.counters["entries_deleted"] += len(doomed)
            return len(doomed)

    def pin(self, tenant: str, family_id: str, entry_ids: Sequence[bytes], ttl_s: int) -> tuple[str, int]:
        tenant = _tenant(tenant)
        _check_ttl(ttl_s, allow_zero=False)
        with self._lock:
            self.models.family(family_id)
            recs = [r for r in (self._entries.get(EntryId(bytes(e))) for e in entry_ids)
                    if r is not None and r.meta.tenant == tenant and r.meta.family_id == family_id]
            return self._pin_locked(recs, ttl_s), len(recs)

    def _pin_locked(self, recs: list[_Record], ttl_s: int) -> str:
        for rec in recs:
            rec.pins += 1
        lease_id = secrets.token_hex(12)
        self._leases[lease_id] = _Lease(list(recs), time.monotonic() + ttl_s)
        return lease_id

    def unpin(self, lease_id: str) -> None:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                raise NotFound(f"lease {lease_id!r} does not exist (expired or released)")
            self._unpin_locked(lease)

    def _unpin_locked(self, lease: _Lease) -> None:
        for rec in lease.records:
            rec.pins -= 1
            self._release_locked(rec)

    def list_entries(self, tenant: str, family_id: str, producer: str, limit: int,
                     page_token: str) -> tuple[list[tuple[EntryMeta, Tier, bool]], str]:
        limit = limit or 100
        with self._lock:
            rows = sorted((r for r in self._entries.values()
                           if (not tenant or r.meta.tenant == tenant)
                           and (not family_id or r.meta.family_id == family_id)
                           and (not producer or r.meta.producer == producer)
                           and r.meta.entry_id.hex() > page_token),
                          key=lambda r: r.meta.entry_id)
            page = [(r.meta, r.tier, r.pins > 0) for r in rows[:limit]]
        token = page[-1][0].entry_id.hex() if len(rows) > limit else ""
        return page, token

    def stats(self) -> dict:
        with self._lock:
            arena = self._arena.stats()
            reserved = sum(self._arena.extent_bytes(p.mem_offset) for r in self._reservations.values()
                           for p in r.pending if p.mem_offset is not None)
            return {
                "node_id": self.node_id, "chunk_size": self.config.chunk_size,
                "entries": len(self._entries), "models": len(self.models.models()),
                "open_reservations": len(self._reservations),
                "memory": {"capacity_bytes": arena.capacity_bytes,
                           "used_bytes": arena.used_bytes - reserved, "reserved_bytes": reserved,
                           "entries": len(self._mem_lru), "evictions": self.counters["mem_evictions"],
                           "free_extents": arena.free_extents},
                "disk": {"capacity_bytes": self.config.disk_capacity_bytes if self._disk else 0,
                         "used_bytes": self._disk_used, "reserved_bytes": 0,
                         "entries": len(self._disk_lru),
                         "evictions": self.counters["disk_evictions"]},
                "counters": {**self.counters, "entries_being_read":
                             sum(1 for r in self._entries.values() if r.readers)},
                "uptime_s": int(time.time() - self.started_at),
            }

    # ------------------------------------------------------------ expiry

    def reap(self) -> None:
        """Abort expired reservations and release expired leases."""
        now = time.monotonic()
        with self._lock:
            expired = [r for r in self._reservations.values() if r.deadline < now]
            for lease_id, lease in list(self._leases.items()):
                if lease.deadline < now:
                    del self._leases[lease_id]
                    self._unpin_locked(lease)
                    self.counters["leases_expired"] += 1
        for res in expired:
            with res.lock:
                if not res.closed and res.deadline < time.monotonic():
                    log.info("reservation expired", extra={"reservation": res.reservation_id})
                    self._close_reservation(res, "reservations_expired")

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.config.reap_interval_s):
            self.reap()


def _pop_if(lru: OrderedDict[EntryId, _Record], rec: _Record) -> None:
    """Remove rec from an id-keyed map only if it is rec (not a re-put successor)."""
    if lru.get(rec.meta.entry_id) is rec:
        del lru[rec.meta.entry_id]


def _tenant(tenant: str) -> str:
    if len(tenant) > MAX_TENANT_CHARS:
        raise InvalidArgument(f"tenant is {len(tenant)} chars, at most {MAX_TENANT_CHARS}")
    return tenant or DEFAULT_TENANT


def _check_ttl(ttl_s: int, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not low <= ttl_s <= MAX_LEASE_TTL_S:
        raise InvalidArgument(f"lease ttl must be in {low}..{MAX_LEASE_TTL_S} s, got {ttl_s}")


__all__ = ["CacheStore", "StoreConfig", "DiskMode", "EntryInput", "Tier", "Reservation",
           "LookupResult", "ProducerHit", "ReadHandle", "ReadRun"]
