"""The cache store: the domain service behind the gRPC servicer and the data plane (it
knows nothing of gRPC), and the one owner of the store lock.

Its parts, each under ~300 lines: the catalog (records, chunk index, tier LRUs:
cachesvc.node.catalog), the tiers (memory extents, eviction, spill, disk writes:
cachesvc.node.tiers), the two-phase put (cachesvc.node.puts), the model and profile
registries; reads, lookups, leases and stats are here.

Concurrency: one ``_lock`` guards every mutable structure of every part; payload bytes
are copied outside it, protected by state instead: a reservation's extent is only touched
under the reservation's own lock, and a committed entry's bytes are only freed when
``readers == 0 and pins == 0``. Lock order is reservation lock → store lock; the store
lock is never held while taking a reservation lock, doing disk I/O (entry files and the
registries' JSON files alike) or copying payload.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from cachesvc.node.arena import Arena
from cachesvc.node.catalog import Catalog, EntryRecord
from cachesvc.node.crosscontext import CrossContext
from cachesvc.node.disk import DiskTier
from cachesvc.node.entries import EntryMeta, split_run
from cachesvc.node.models import ModelRecord, ModelRegistry, RegisterOutcome
from cachesvc.node.profiles import ProfileRecord, ProfileRegistry
from cachesvc.node.puts import PutPath
from cachesvc.node.records import tenant_name as _tenant
from cachesvc.node.records import (DiskMode, EntryInput, LookupAnswer, ProducerHit, ReadHandle, ReadRun,
                                   Reservation, StoreConfig)
from cachesvc.node.tiers import Tiers
from cachesvc.wire.errors import FailedPrecondition, InvalidArgument, NotFound
from cachesvc.wire.keys import (ENTRY_ID_BYTES, FamilyId, FamilySpec, Kind, Tier, chain_root,
                                check_chunk_hashes)

log = logging.getLogger(__name__)

MAX_LEASE_TTL_S = 3600


@dataclass(slots=True)
class _ReadTally:
    """What one read delivered; added to the counters once, when the read ends (taking
    the store lock once per run would put it on the data plane's hot path)."""

    slabs: int = 0
    size_bytes: int = 0


@dataclass(slots=True)
class _Lease:
    records: list[EntryRecord]     # the records pinned (not ids: an id can be re-put meanwhile)
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
        self.models = ModelRegistry(Path(config.disk_dir) / "models.json" if disk_on else None)
        self.profiles = ProfileRegistry(self.models, Path(config.disk_dir) / "profiles.json" if disk_on else None)
        self.counters: dict[str, int] = dict.fromkeys((
            "lookups", "lookup_chunks", "hit_chunks", "puts_committed", "entries_committed",
            "puts_aborted", "reservations_expired", "leases_granted", "leases_expired", "slabs_read",
            "bytes_read", "bytes_written", "checksum_failures", "mem_evictions",
            "disk_evictions", "disk_writes", "disk_write_errors", "entries_deleted",
            # the longest hit of the consumer's own entries, and of another producer's
            "hit_chunks_same_model", "hit_chunks_cross_model", "located_lookups", "profile_flags",
            # payload bytes served per path (grpc, tcp, shm, ucx, and the LMCache endpoint)
            "bytes_read_grpc", "bytes_read_tcp", "bytes_read_shm", "bytes_read_ucx", "bytes_read_lm",
            "bytes_read_replication"), 0)
        self._catalog = Catalog(self._arena, self._disk, self.counters)
        self._tiers = Tiers(self._lock, self._catalog, self._arena, self._disk, config, self.counters)
        self._puts = PutPath(self._lock, self._catalog, self._arena, self._tiers, self.models, config,
                             self.counters)
        self._leases: dict[str, _Lease] = {}
        # Segment sources and anchor pools (cross-context reuse), under this lock too.
        self.cross = CrossContext(self._lock, self._catalog, self.models, self.counters, self._delete_locked,
                                  config.segment_sources, config.anchor_pool_bytes,
                                  Path(config.disk_dir) if disk_on else None)
        self.started_at = time.time()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        if self._disk is not None:
            self._tiers.load_disk_locked(self.models)   # no other thread yet

    @property
    def arena(self) -> Arena:
        """The memory tier's arena (the same-host data plane shares its memfd)."""
        return self._arena

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the reaper (expiry of reservations and leases) and the disk writer."""
        self._threads.append(threading.Thread(target=self._reap_loop, name="reaper", daemon=True))
        if self.config.disk_mode == DiskMode.WRITE_THROUGH:
            self._threads.append(threading.Thread(target=self._tiers.persist_loop, name="persister",
                                                  daemon=True))
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop background work; make every committed memory entry durable if the disk
        tier is on (drain the write-through queue, or spill in spill mode)."""
        self._stop.set()
        self._tiers.persist_queue.put(None)
        for thread in self._threads:
            thread.join()
        if self._disk is not None:
            self._tiers.persist_all()
        self.cross.close()
        self._arena.close()

    # ------------------------------------------------------------ models

    def register_model(self, model_id: str, weights_digest: str, family: FamilySpec,
                       replace: bool, tenant: str = "") -> RegisterOutcome:
        """Register ``tenant``'s model; a replace drops that tenant's entries of it (other
        tenants' models of the same id are other records: cachesvc.node.models)."""
        tenant = _tenant(tenant)
        with self._lock:
            reg = self.models.register(model_id, weights_digest, family, replace, tenant=tenant)
            if reg.replaced is not None:
                doomed = [r for r in self._catalog.entries.values()
                          if r.meta.producer == model_id and r.meta.tenant == tenant]
                for rec in doomed:
                    self._catalog.delete(rec)
                log.info("model replaced", extra={"model_id": model_id, "entries_dropped": len(doomed)})
        self.models.flush()
        return reg

    def get_model(self, model_id: str, tenant: str = "") -> ModelRecord:
        with self._lock:
            return self.models.get(model_id, tenant=_tenant(tenant))

    def get_family(self, family_id: str) -> FamilySpec:
        """NotFound when no registered model is of ``family_id``."""
        with self._lock:
            return self.models.family(family_id)

    def list_models(self, tenant: str | None = "") -> list[ModelRecord]:
        """``tenant``'s models ("": the default tenant's; None: every tenant's)."""
        with self._lock:
            return self.models.models(None if tenant is None else _tenant(tenant))

    # ------------------------------------------------------------ reuse profiles

    def put_profile(self, producer: str, consumer: str, producer_digest: str, consumer_digest: str,
                    document: bytes, tenant: str = "") -> ProfileRecord:
        with self._lock:
            rec = self.profiles.put(producer, consumer, producer_digest, consumer_digest, document,
                                    tenant=_tenant(tenant))
        self.profiles.flush()
        return rec

    def get_profile(self, producer: str, consumer: str, tenant: str = "") -> ProfileRecord:
        with self._lock:
            return self.profiles.get(producer, consumer, tenant=_tenant(tenant))

    def flag_profile(self, producer: str, consumer: str, version: int, reason: str,
                     tenant: str = "") -> tuple[bool, int]:
        with self._lock:
            result = self.profiles.flag(producer, consumer, version, reason, tenant=_tenant(tenant))
            self.counters["profile_flags"] += result[0]
        self.profiles.flush()
        return result

    def list_profiles(self, producer: str = "", consumer: str = "",
                      tenant: str | None = "") -> list[tuple[ProfileRecord, bool]]:
        """``tenant``'s matching profiles with their staleness ("": the default tenant's;
        None: every tenant's)."""
        with self._lock:
            return [(rec, self.profiles.stale(rec)) for rec in
                    self.profiles.list(producer, consumer, None if tenant is None else _tenant(tenant))]

    # ------------------------------------------------------------ two-phase put (cachesvc.node.puts)

    def reserve(self, tenant: str, family_id: str, producer: str, entries: Sequence[EntryInput],
                ttl_s: int = 0, producer_digest: str = "") -> Reservation:
        tenant = _tenant(tenant)
        _check_ttl(ttl_s, allow_zero=True)
        return self._puts.reserve(tenant, family_id, producer, entries,
                                  float(ttl_s) if ttl_s else self.config.reservation_ttl_s, producer_digest)

    def write(self, reservation_id: str, entry_index: int, offset: int, data: memoryview) -> int:
        """Copy one in-order piece of an entry's payload; returns bytes received so far."""
        def copy(dest: memoryview) -> None:
            dest[:] = data
        return self.write_from(reservation_id, entry_index, offset, len(data), copy)

    def write_from(self, reservation_id: str, entry_index: int, offset: int, size: int,
                   fill: Callable[[memoryview], None]) -> int:
        """Let ``fill`` put the next ``size`` bytes of an entry's payload straight into the
        memory tier; see PutPath.write_from. Returns bytes received."""
        return self._puts.write_from(reservation_id, entry_index, offset, size, fill)

    def commit(self, reservation_id: str, seal: bool = False) -> int:
        """Verify and publish every entry of the reservation at once; returns how many
        entries became visible. A checksum mismatch aborts the whole reservation.
        ``seal``: compute the checksums instead (see PutPath.commit)."""
        committed = self._puts.commit(reservation_id, seal)
        if self.config.disk_mode == DiskMode.WRITE_THROUGH:
            for entry in committed:
                self._tiers.persist_queue.put(entry)
        return len(committed)

    def abort(self, reservation_id: str) -> None:
        self._puts.abort(reservation_id)

    # ------------------------------------------------------------ lookup

    def lookup(self, tenant: str, family_id: str, chunk_hashes: Sequence[bytes], consumer: str = "",
               producers: Sequence[str] = (), lease_ttl_s: int = 0,
               tail_hashes: Sequence[bytes] = (), offer_tails: bool = False,
               locate: bool = False) -> LookupAnswer:
        """Per producer, the longest run of leading chunks it has entries for; a producer
        holding all of them gets the first of ``tail_hashes`` (partial chunks continuing
        the chain, longest first) it holds appended. With ``offer_tails``, each producer
        whose run stops before the request's end is also offered the partial chunks it
        stored after the run's last chunk (or after the chain's root), for the client to
        verify against its own tokens. With ``locate``, each hit also says where its
        entries' payloads lie in the memory tier (for same-host readers)."""
        tenant = _tenant(tenant)
        try:
            check_chunk_hashes(chunk_hashes)
            check_chunk_hashes(tail_hashes, "tail_hashes")
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if len(tail_hashes) > self.config.chunk_size:
            raise InvalidArgument(f"{len(tail_hashes)} tail_hashes: at most one per length of a "
                                  f"partial chunk ({self.config.chunk_size})")
        _check_ttl(lease_ttl_s, allow_zero=True)
        with self._lock:
            self.models.family(family_id)
            if consumer:
                model = self.models.get(consumer, tenant=tenant)
                if model.family_id != family_id:
                    raise FailedPrecondition(f"consumer {consumer!r} is of family "
                                             f"{model.family_id}, not {family_id}: its cache "
                                             "cannot be shared")
            runs = self._catalog.longest_runs(tenant, family_id, chunk_hashes, set(producers), tail_hashes)
            offers = self._offers(tenant, family_id, chunk_hashes, runs, set(producers)) if offer_tails else {}
            hits = [ProducerHit(p, p == consumer, [r.meta for r in recs], [r.tier for r in recs],
                                [r.meta for r in offers.get(p, ())], [r.tier for r in offers.get(p, ())],
                                _arena_offsets(recs) if locate else [],
                                _arena_offsets(offers.get(p, ())) if locate else [])
                    for p, recs in sorted(((p, runs.get(p, [])) for p in {*runs, *offers}),
                                          key=lambda kv: (-len(kv[1]), kv[0]))]
            lease_id = ""
            if lease_ttl_s and hits:
                held = [r for recs in (*runs.values(), *offers.values()) for r in recs]
                lease_id = self._pin_locked(held, lease_ttl_s)
                self.counters["leases_granted"] += 1
            self.counters["lookups"] += 1
            self.counters["lookup_chunks"] += len(chunk_hashes)
            self.counters["hit_chunks"] += max((len(r) for r in runs.values()), default=0)
            self.counters["hit_chunks_same_model"] += len(runs.get(consumer, ())) if consumer else 0
            self.counters["hit_chunks_cross_model"] += max((len(r) for p, r in runs.items() if p != consumer),
                                                           default=0)
            self.counters["located_lookups"] += locate
        return LookupAnswer(hits, lease_id)

    def _offers(self, tenant: str, family_id: str, hashes: Sequence[bytes], runs: dict[str, list[EntryRecord]],
                only: set[str]) -> dict[str, list[EntryRecord]]:
        """Per producer whose run stops before the request's end: the partial chunks it
        stored after the run's last chunk (after the chain's root for an empty run)."""
        offers: dict[str, list[EntryRecord]] = {}
        for producer, run in runs.items():
            if len(run) < len(hashes):
                found = self._catalog.tails(tenant, family_id, hashes[len(run) - 1], producer)
                if found:
                    offers[producer] = found
        if hashes and self._catalog.partials.get((tenant, family_id)):
            # Producers without chunk 0: a context shorter than a chunk, stored after the root.
            root = chain_root(tenant, FamilyId(family_id), self.config.chunk_size)
            for producer in self._catalog.tail_producers(tenant, family_id, root):
                if producer not in runs and (not only or producer in only):
                    offers[producer] = self._catalog.tails(tenant, family_id, root, producer)
        return offers

    # ------------------------------------------------------------ read

    def read(self, tenant: str, family_id: str, entry_ids: Sequence[bytes], kinds: Sequence[Kind],
             layer_start: int, layer_end: int, layer_major: bool = False, path: str = "grpc") -> "ReadHandle":
        """:meth:`read_selections` of one selection."""
        return self.read_selections(tenant, family_id, entry_ids, [(kinds, layer_start, layer_end)], layer_major,
                                    path)

    def read_selections(self, tenant: str, family_id: str, entry_ids: Sequence[bytes],
                        selections: Sequence[tuple[Sequence[Kind], int, int]], layer_major: bool = False,
                        path: str = "grpc") -> "ReadHandle":
        """Runs of the requested slabs: per selection (kinds, layer_start, layer_end; an
        end of 0 means every layer), in order. Every entry is held (never freed or
        evicted) until the handle is closed, however far it was iterated: use it as a
        context manager. Validation happens here, so errors surface before any run.
        Order within a selection: entry, kind, layer runs; or, with ``layer_major``, one
        slab per run in (layer, entry, kind) order, so a reader can use layer l as soon
        as it has arrived. ``path`` names the transport the bytes leave by (for the
        per-path byte counters)."""
        tenant = _tenant(tenant)
        with self._lock:
            family = self.models.family(family_id)
        if not selections or len(selections) > MAX_SELECTIONS:
            raise InvalidArgument(f"a read needs 1 to {MAX_SELECTIONS} selections, got {len(selections)}")
        ranges: list[tuple[list[Kind], int, int]] = []
        taken: dict[Kind, list[tuple[int, int]]] = {}   # per kind, the layer ranges asked for so far
        for kinds, layer_start, layer_end in selections:
            end = layer_end or family.num_layers
            if not 0 <= layer_start < end <= family.num_layers:
                raise InvalidArgument(f"layer range [{layer_start}, {end}) is not inside "
                                      f"[0, {family.num_layers})")
            if not kinds or any(k not in (Kind.K, Kind.V, Kind.E) for k in kinds):
                raise InvalidArgument(f"kinds must be a non-empty list of K, V, E; got {list(kinds)}")
            for kind in map(Kind, kinds):
                for a, b in taken.get(kind, ()):
                    if a < end and layer_start < b:   # a kind repeated, or ranges that overlap
                        raise InvalidArgument(f"selections ask for {kind.name} of layer {max(a, layer_start)} "
                                              f"more than once")
                taken.setdefault(kind, []).append((layer_start, end))
            ranges.append((list(kinds), layer_start, end))
        for i, e in enumerate(entry_ids):
            if len(e) != ENTRY_ID_BYTES:
                raise InvalidArgument(f"entry_ids[{i}] has {len(e)} bytes, expected {ENTRY_ID_BYTES}")
        with self._lock:
            recs = self._catalog.owned(entry_ids, tenant, family_id)
            for r in recs:
                if r is not None:
                    r.readers += 1
                    self._catalog.touch(r)
        tally = _ReadTally()
        runs = (run for kinds, start, end in ranges
                for run in self._read_runs(recs, kinds, start, end, layer_major, tally))
        return ReadHandle(runs, lambda: self._end_read(recs, tally, path))

    def _read_runs(self, recs: list[EntryRecord | None], kinds: Sequence[Kind], start: int,
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

    def _end_read(self, recs: list[EntryRecord | None], tally: _ReadTally, path: str) -> None:
        with self._lock:
            self.counters["slabs_read"] += tally.slabs
            self.counters["bytes_read"] += tally.size_bytes
            self.counters[f"bytes_read_{path}"] += tally.size_bytes
            for rec in recs:
                if rec is not None:
                    rec.readers -= 1
                    self._catalog.release(rec)

    def _entry_runs(self, index: int, rec: EntryRecord, kind: Kind, start: int,
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

    def _run_bytes(self, index: int, rec: EntryRecord, kind: Kind, run: list) -> ReadRun:
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

    def _quarantine(self, rec: EntryRecord) -> None:
        log.error("checksum failure on disk", extra={"entry": rec.meta.entry_id.hex()})
        with self._lock:
            self.counters["checksum_failures"] += 1
            if not rec.deleted:
                self._catalog.delete(rec)

    # ------------------------------------------------------------ cluster

    def catalog_listener(self, on_index: Callable[[EntryMeta, Tier], None],
                         on_unindex: Callable[[EntryMeta], None]) -> None:
        """Have every entry entering and leaving the lookup index reported (under the
        store lock: the callbacks only queue)."""
        with self._lock:
            self._catalog.on_index, self._catalog.on_unindex = on_index, on_unindex

    def indexed_entries(self) -> list[tuple[EntryMeta, Tier]]:
        """Every committed entry lookups can find, with its tier: a snapshot."""
        with self._lock:
            return [(r.meta, r.tier) for r in self._catalog.entries.values()]

    def entry_payload(self, meta: EntryMeta) -> bytes | None:
        """A committed entry's whole payload, through the read path (held while read;
        disk bytes verified, a rotten file quarantined), for copying it to another node,
        which verifies every slab again on commit. None when it is gone or incomplete."""
        with self.read(meta.tenant, meta.family_id, [meta.entry_id], [Kind.K, Kind.V, Kind.E], 0, 0,
                       path="replication") as runs:
            data = b"".join(bytes(run.data) for run in runs if not run.missing_reason)
        return data if len(data) == meta.size_bytes else None

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
            return self._delete_locked(tenant, family_id, chunk_hashes, producer, entry_ids)

    def _delete_locked(self, tenant: str, family_id: str, chunk_hashes: Sequence[bytes], producer: str,
                       entry_ids: Sequence[bytes] = ()) -> int:
        doomed = {id(r): r for r in self._catalog.owned(entry_ids, tenant, family_id) if r is not None}
        doomed.update((id(r), r) for r in self._catalog.of_chunks(tenant, family_id, chunk_hashes, producer))
        for rec in doomed.values():
            self._catalog.delete(rec)
        self.counters["entries_deleted"] += len(doomed)
        return len(doomed)

    def touch(self, tenant: str, family_id: str, entry_ids: Sequence[bytes]) -> None:
        """Count a use of these entries (those present) without reading them: a writer
        that offered one again (the ``lm://`` PUT of a key it holds) expects it to stay."""
        tenant = _tenant(tenant)
        with self._lock:
            for rec in self._catalog.owned(entry_ids, tenant, family_id):
                if rec is not None:
                    self._catalog.touch(rec)

    def pin(self, tenant: str, family_id: str, entry_ids: Sequence[bytes], ttl_s: int) -> tuple[str, int]:
        tenant = _tenant(tenant)
        _check_ttl(ttl_s, allow_zero=False)
        with self._lock:
            self.models.family(family_id)
            recs = [r for r in self._catalog.owned(entry_ids, tenant, family_id) if r is not None]
            return self._pin_locked(recs, ttl_s), len(recs)

    def _pin_locked(self, recs: list[EntryRecord], ttl_s: int) -> str:
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
            self._catalog.release(rec)

    def entries_of(self, tenant: str, family_id: str, entry_ids: Sequence[bytes]) -> list[EntryMeta | None]:
        """The committed entries of ``entry_ids`` in order (None where absent, or another
        tenant's or family's); a snapshot, holding nothing."""
        tenant = _tenant(tenant)
        with self._lock:
            return [None if r is None else r.meta for r in self._catalog.owned(entry_ids, tenant, family_id)]

    def list_entries(self, tenant: str, family_id: str, producer: str, limit: int,
                     page_token: str) -> tuple[list[tuple[EntryMeta, Tier, bool]], str]:
        limit = limit or 100
        with self._lock:
            rows, more = self._catalog.page(tenant, family_id, producer, page_token, limit)
            page = [(r.meta, r.tier, r.pins > 0) for r in rows]
        token = page[-1][0].entry_id.hex() if more else ""
        return page, token

    def usage_by_tenant(self) -> dict[tuple[str, str], int]:
        """(tenant, "memory" | "disk") -> bytes of committed entries: a walk of the index,
        for metrics scrapes (seconds apart), not for the request path."""
        usage: dict[tuple[str, str], int] = {}
        with self._lock:
            for rec in self._catalog.entries.values():
                tenant = rec.meta.tenant
                if rec.mem_offset is not None:
                    usage[(tenant, "memory")] = usage.get((tenant, "memory"), 0) + rec.meta.size_bytes
                if rec.disk_bytes:
                    usage[(tenant, "disk")] = usage.get((tenant, "disk"), 0) + rec.disk_bytes
        return usage

    def stats(self) -> dict:
        with self._lock:
            arena, catalog = self._arena.stats(), self._catalog
            reserved = self._puts.reserved_bytes_locked()
            return {
                "node_id": self.node_id, "chunk_size": self.config.chunk_size,
                "entries": len(catalog.entries), "models": len(self.models.models()),
                "open_reservations": self._puts.open_count_locked(),
                "memory": {"capacity_bytes": arena.capacity_bytes,
                           "used_bytes": arena.used_bytes - reserved, "reserved_bytes": reserved,
                           "entries": len(catalog.mem_lru), "evictions": self.counters["mem_evictions"],
                           "free_extents": arena.free_extents},
                "disk": {"capacity_bytes": self.config.disk_capacity_bytes if self._disk else 0,
                         "used_bytes": catalog.disk_used, "reserved_bytes": 0,
                         "entries": len(catalog.disk_lru),
                         "evictions": self.counters["disk_evictions"]},
                "counters": {**self.counters, **self.cross.gauges(), "entries_being_read":
                             sum(1 for r in catalog.entries.values() if r.readers)},
                "uptime_s": int(time.time() - self.started_at),
            }

    # ------------------------------------------------------------ expiry

    def reap(self) -> None:
        """Abort expired reservations and release expired leases."""
        now = time.monotonic()
        with self._lock:
            expired = self._puts.expired_locked(now)
            for lease_id, lease in list(self._leases.items()):
                if lease.deadline < now:
                    del self._leases[lease_id]
                    self._unpin_locked(lease)
                    self.counters["leases_expired"] += 1
        for res in expired:
            self._puts.expire(res)

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.config.reap_interval_s):
            self.reap()


MAX_SELECTIONS = 64
"""Selections one read may carry (a plan needs a few)."""


def _arena_offsets(recs: Sequence[EntryRecord]) -> list[int]:
    """Where each record's payload starts in the memory tier; -1 for one only on disk."""
    return [-1 if r.mem_offset is None else r.mem_offset for r in recs]


def _check_ttl(ttl_s: int, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not low <= ttl_s <= MAX_LEASE_TTL_S:
        raise InvalidArgument(f"lease ttl must be in {low}..{MAX_LEASE_TTL_S} s, got {ttl_s}")


__all__ = ["CacheStore", "StoreConfig", "DiskMode", "EntryInput", "Tier", "Reservation",
           "LookupAnswer", "ProducerHit", "ReadHandle", "ReadRun"]
