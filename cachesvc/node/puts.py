"""The two-phase put (Mooncake's put-start / put-end): reserve → write in order → commit,
or abort; an idle reservation expires. Part of the store (cachesvc.node.store).

Only committed entries are visible, all of a reservation's at once. A reservation's
extents are touched only under the reservation's own ``lock`` (so an abort cannot free
them under a writer). Lock order: reservation lock → store lock; the store lock is never
held while taking a reservation lock or copying payload.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import xxhash

from cachesvc.node.arena import Arena
from cachesvc.node.catalog import Catalog, EntryRecord
from cachesvc.node.entries import EntryMeta, plan_entry
from cachesvc.node.models import ModelRegistry
from cachesvc.node.records import EntryInput, Reservation, StoreConfig
from cachesvc.node.tiers import Tiers
from cachesvc.wire.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from cachesvc.wire.keys import EntryId, FamilyId

log = logging.getLogger("cachesvc.node.store")


@dataclass(slots=True)
class _Pending:
    meta: EntryMeta
    mem_offset: int | None          # None when already_present
    received: int = 0               # bytes written so far, in order


@dataclass(slots=True)
class _OpenReservation:
    reservation_id: str
    ttl_s: float
    deadline: float                 # time.monotonic() after which the reaper aborts it
    pending: list[_Pending]
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False            # committed or aborted; guarded by lock
    producer: str = ""
    weights_digest: str = ""        # the producer's at reserve: a replace since voids the put
    tenant: str = ""                # whose model the producer is


class PutPath:
    """Open reservations and their state machine: open → committed | aborted | expired."""

    def __init__(self, lock: threading.Lock, catalog: Catalog, arena: Arena, tiers: Tiers,
                 models: ModelRegistry, config: StoreConfig, counters: dict[str, int]) -> None:
        self._lock, self.catalog, self.arena, self.tiers = lock, catalog, arena, tiers
        self.models, self.config, self.counters = models, config, counters
        self._open: dict[str, _OpenReservation] = {}

    def reserve(self, tenant: str, family_id: str, producer: str, entries: Sequence[EntryInput],
                ttl_s: float, producer_digest: str = "") -> Reservation:
        """Validate every slab, allocate memory for the entries not already present.
        ``producer_digest``: the weights the writer computed them with; refused unless
        they are the producer's registered ones."""
        with self._lock:
            family = self.models.family(family_id)
            model = self.models.get(producer, tenant=tenant)
        if model.family_id != family_id:
            raise FailedPrecondition(f"producer {producer!r} is of family {model.family_id}, "
                                     f"not {family_id}")
        if producer_digest and producer_digest.lower() != model.weights_digest:
            raise FailedPrecondition(f"producer {producer!r} is registered with weights "
                                     f"{model.weights_digest[:16]}, not {producer_digest[:16]}")
        if not entries:
            raise InvalidArgument("a reservation needs at least one entry")
        metas = [plan_entry(i, tenant, FamilyId(family_id), family, producer, e.chunk_hash,
                            e.position_offset, e.num_tokens, e.slabs, self.config.chunk_size,
                            e.parent_hash)
                 for i, e in enumerate(entries)]
        ids = [m.entry_id for m in metas]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("the same (chunk_hash, position_offset) appears twice")
        with self._lock:
            held = [self.catalog.entries.get(m.entry_id) for m in metas]
            present = [rec is not None and rec.meta == m for rec, m in zip(held, metas, strict=True)]
            for rec, is_present in zip(held, present, strict=True):
                if is_present:   # put again: a use, as a read is (the writer expects it to stay)
                    self.catalog.touch(rec)
        need = sum(m.size_bytes for m, p in zip(metas, present, strict=True) if not p)
        if need > self.arena.capacity_bytes:
            raise ResourceExhausted(f"reservation needs {need} bytes, memory tier capacity is "
                                    f"{self.arena.capacity_bytes} bytes: split the put")
        pending: list[_Pending] = []
        try:
            for meta, is_present in zip(metas, present, strict=True):
                offset = None if is_present else self.tiers.allocate(meta.size_bytes, tenant)
                pending.append(_Pending(meta, offset))
        except ResourceExhausted:
            self._free_pending(pending)
            raise
        res = _OpenReservation(secrets.token_hex(12), ttl_s, time.monotonic() + ttl_s, pending,
                               producer=producer, weights_digest=model.weights_digest, tenant=tenant)
        with self._lock:
            self._open[res.reservation_id] = res
        return Reservation(res.reservation_id, metas, present, ttl_s)

    def write_from(self, reservation_id: str, entry_index: int, offset: int, size: int,
                   fill: Callable[[memoryview], None]) -> int:
        """Let ``fill`` put the next ``size`` bytes of an entry's payload straight into the
        memory tier (a socket's ``recv_into``, a copy). If ``fill`` raises, nothing of it
        counts and the error propagates (the caller aborts). Returns bytes received."""
        res = self._get(reservation_id)
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
            fill(self.arena.view[base + offset:base + end])
            p.received = end
            res.deadline = time.monotonic() + res.ttl_s
        with self._lock:
            self.counters["bytes_written"] += size
        return end

    def commit(self, reservation_id: str, seal: bool = False) -> list[EntryId]:
        """Verify and publish every entry of the reservation at once; returns the entries
        that became visible. A checksum mismatch aborts the whole reservation.

        ``seal``: the writer could not declare checksums before sending (LMCache's
        ``lm://`` PUT sends its header, then the bytes, and nothing after): the node
        computes them from what it received instead of verifying them. From then on the
        entry is protected like any other (disk reads and clients verify)."""
        res = self._get(reservation_id)
        with res.lock:
            if res.closed:
                raise FailedPrecondition(f"reservation {reservation_id} is already closed")
            for i, p in enumerate(res.pending):
                if p.mem_offset is not None and p.received != p.meta.size_bytes:
                    raise FailedPrecondition(f"entry {i} has {p.received} of "
                                             f"{p.meta.size_bytes} bytes: write the rest first")
            if seal:
                self._seal(res.pending)
            bad = self._first_bad_slab(res.pending)
            if bad:
                self._close(res, "puts_aborted")
                raise InvalidArgument(f"{bad}; reservation {reservation_id} aborted")
            return self._publish(res)

    def abort(self, reservation_id: str) -> None:
        res = self._get(reservation_id)
        with res.lock:
            if not res.closed:
                self._close(res, "puts_aborted")

    def expired_locked(self, now: float) -> list[_OpenReservation]:
        """Reservations past their deadline (under the store lock; expire them after)."""
        return [r for r in self._open.values() if r.deadline < now]

    def expire(self, res: _OpenReservation) -> None:
        """Abort ``res`` if it is still open and idle (without the store lock)."""
        with res.lock:
            if not res.closed and res.deadline < time.monotonic():
                log.info("reservation expired", extra={"reservation": res.reservation_id})
                self._close(res, "reservations_expired")

    def open_count_locked(self) -> int:
        return len(self._open)

    def reserved_bytes_locked(self) -> int:
        return sum(self.arena.extent_bytes(p.mem_offset) for r in self._open.values()
                   for p in r.pending if p.mem_offset is not None)

    # ------------------------------------------------------------ internals

    def _get(self, reservation_id: str) -> _OpenReservation:
        with self._lock:
            res = self._open.get(reservation_id)
        if res is None:
            raise NotFound(f"reservation {reservation_id!r} does not exist "
                           "(never made, committed, aborted or expired)")
        return res

    def _first_bad_slab(self, pending: list[_Pending]) -> str:
        view = self.arena.view
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

    def _seal(self, pending: list[_Pending]) -> None:
        view = self.arena.view
        for p in pending:
            if p.mem_offset is not None:
                base = p.mem_offset
                p.meta = dataclasses.replace(p.meta, slabs=tuple(
                    dataclasses.replace(s, checksum=xxhash.xxh3_64_intdigest(
                        view[base + s.offset:base + s.offset + s.size_bytes])) for s in p.meta.slabs))

    def _publish(self, res: _OpenReservation) -> list[EntryId]:
        """Under res.lock: make the entries visible, unless the producer was replaced (or
        dropped) since the reserve: its entries were computed with weights it no longer
        has, and the replace already dropped every entry of the old ones."""
        committed: list[EntryId] = []
        with self._lock:
            try:
                current = self.models.get(res.producer, tenant=res.tenant).weights_digest
            except NotFound:
                current = ""
            replaced = current != res.weights_digest
            if not replaced:
                committed = self._publish_locked(res)
        if replaced:
            self._close(res, "puts_aborted")
            raise FailedPrecondition(f"producer {res.producer!r} was registered with other weights since this "
                                     f"reservation was made; reservation {res.reservation_id} aborted")
        return committed

    def _publish_locked(self, res: _OpenReservation) -> list[EntryId]:
        """Under res.lock and the store lock."""
        committed: list[EntryId] = []
        for p in res.pending:
            if p.mem_offset is None:
                continue
            self.catalog.add_in_memory(EntryRecord(p.meta, p.mem_offset))
            p.mem_offset = None     # ownership moves to the record
            committed.append(p.meta.entry_id)
        res.closed = True
        self._open.pop(res.reservation_id, None)
        self.counters["puts_committed"] += 1
        self.counters["entries_committed"] += len(committed)
        return committed

    def _close(self, res: _OpenReservation, counter: str) -> None:
        """Under res.lock: abort, returning its memory."""
        res.closed = True
        self._free_pending(res.pending)
        with self._lock:
            self._open.pop(res.reservation_id, None)
            self.counters[counter] += 1

    def _free_pending(self, pending: list[_Pending]) -> None:
        with self._lock:
            for p in pending:
                if p.mem_offset is not None:
                    self.arena.free(p.mem_offset)
                    p.mem_offset = None
