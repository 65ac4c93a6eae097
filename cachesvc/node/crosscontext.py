"""Cross-context reuse in the store: the segment index and the anchor pools, checked against
the committed entries they refer to (docs/agents.md).

The store owns the lock and hands it here with its catalog; every change happens under it,
and the journals (``segments.jsonl``, ``anchors.json``) are written after it is released,
as the registries' files are. Rules:

- a segment source is accepted only when every chunk of its chain is committed for its
  producer, the producer is a model of the family, and the chain holds the span; a find
  drops the sources that no longer hold;
- an anchor's base is a source (checked the same way); a delta's chains must be committed
  entries of its producer, and their size is what the pool's budget counts; evicted or
  replaced deltas' entries are deleted; an anchor whose base is gone is dropped on find
  (a stale anchor is never handed out).

In a cluster (``remote`` set by the node's cluster agent) a chain is usually spread over
several nodes: what this node does not hold whole is asked of the cluster's index, outside
the store lock (a Redis round trip must not stall the node's data path), so each call
checks in three steps: the request and the local chains under the lock, the rest against
the cluster without it, then the change under the lock again. While the index cannot be
asked, a put that needs it fails Unavailable and a find neither returns nor drops the
sources it could not check. Evicted deltas' entries are deleted where this node holds
them; copies on other nodes are no longer referenced and leave by their tiers' LRU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from cachesvc.node.anchors import AnchorPool, Evicted, PoolKey
from cachesvc.node.catalog import Catalog, EntryRecord
from cachesvc.node.models import ModelRegistry
from cachesvc.node.records import tenant_name
from cachesvc.node.segments import SegmentIndex
from cachesvc.wire.errors import FailedPrecondition, InvalidArgument, Unavailable
from cachesvc.wire.keys import CHUNK_HASH_BYTES, check_chunk_hashes
from cachesvc.wire.segments import MAX_PREFIX_TOKENS, AnchorDelta, AnchorInfo, SegmentSource

MAX_FIND_KEYS = 1024

Chain = tuple[str, tuple[bytes, ...]]        # (producer, chunk hashes)
# Per chunk of a chain: (tokens, bytes) of the producer's entry.
Runs = list[tuple[int, int]]
# The cluster's answer for a chain this node does not hold whole: its runs, or None when a
# chunk is held by no live node; raises Unavailable when the index cannot be asked.
RemoteChains = Callable[[str, str, Sequence[bytes], str], Runs | None]
UNKNOWN = "unknown"                          # a chain the cluster could not be asked about


class CrossContext:
    def __init__(self, lock: threading.Lock, catalog: Catalog, models: ModelRegistry, counters: dict[str, int],
                 delete: Callable[[str, str, Sequence[bytes], str], int], max_sources: int, pool_bytes: int,
                 disk_dir: Path | None) -> None:
        self._lock, self._catalog, self._models, self._counters = lock, catalog, models, counters
        self._delete = delete   # the store's delete, taken under the lock
        self.remote: RemoteChains | None = None
        self._journal_lock = threading.Lock()
        self.segments = SegmentIndex(max_sources, disk_dir / "segments.jsonl" if disk_dir else None)
        self.anchors = AnchorPool(pool_bytes, disk_dir / "anchors.json" if disk_dir else None)
        counters.update(dict.fromkeys(("segment_puts", "segment_finds", "segment_hits", "segment_sources_dropped",
                                       "anchors_admitted", "anchors_evicted", "anchor_records",
                                       "anchor_finds", "anchors_stale"), 0))

    # ------------------------------------------------------------ segments

    def put_segment(self, tenant: str, family_id: str, key: bytes, source: SegmentSource) -> int:
        tenant = tenant_name(tenant)
        _check_key(key)
        with self._lock:
            self._check_source(tenant, family_id, source, "source")
        self._check_span(source, self._runs(tenant, family_id, _chain(source)), "source")
        with self._lock:
            count = self.segments.put((tenant, family_id, key), source)
            self._counters["segment_puts"] += 1
        self._flush_segments()
        return count

    def find_segments(self, tenant: str, family_id: str, keys: Sequence[bytes], limit: int) -> list[list[SegmentSource]]:
        tenant = tenant_name(tenant)
        if len(keys) > MAX_FIND_KEYS:
            raise InvalidArgument(f"{len(keys)} segment keys in one find, at most {MAX_FIND_KEYS}")
        for key in keys:
            _check_key(key)
        index_keys = [(tenant, family_id, bytes(k)) for k in keys]
        with self._lock:
            self._models.family(family_id)
            held = self._held_here(tenant, family_id, {_chain(s) for k in index_keys for s in self.segments.peek(k)})
        live = self._liveness(tenant, family_id, held)
        with self._lock:
            before = self.segments.count
            found = [self.segments.find(k, live, limit) for k in index_keys]
            self._counters["segment_finds"] += 1
            self._counters["segment_hits"] += sum(1 for f in found if f)
            self._counters["segment_sources_dropped"] += before - self.segments.count
        self._flush_segments()
        return found

    # ------------------------------------------------------------ anchors

    def admit_anchor(self, tenant: str, family_id: str, placeholder: str, key: bytes, length: int,
                     base: SegmentSource) -> tuple[bool, list[bytes]]:
        tenant = tenant_name(tenant)
        _check_key(key)
        with self._lock:
            self._check_source(tenant, family_id, base, "anchor.base")
            if base.length != length:
                raise InvalidArgument(f"anchor.length {length} differs from its base's span ({base.length} tokens)")
        self._check_span(base, self._runs(tenant, family_id, _chain(base)), "anchor.base")
        with self._lock:
            admitted, evicted = self.anchors.admit((tenant, family_id, placeholder), key, length, base)
            self._drop_entries(evicted)
            self._counters["anchors_admitted"] += admitted
            self._counters["anchors_evicted"] += len(evicted)
        self.anchors.flush()
        return admitted, [e.segment_key for e in evicted]

    def record_anchor(self, tenant: str, family_id: str, placeholder: str, key: bytes,
                      delta: AnchorDelta) -> list[bytes]:
        tenant = tenant_name(tenant)
        _check_key(key)
        if not delta.agent or not delta.placeholder_hashes:
            raise InvalidArgument("an anchor delta needs its agent and the chain of its placeholder offsets")
        chains = (("placeholder_hashes", delta.placeholder_hashes), ("following_hashes", delta.following_hashes))
        with self._lock:
            self._check_producer(tenant, family_id, delta.producer, "delta.producer")
        size = 0
        for what, chain in chains:
            try:
                check_chunk_hashes(chain, f"delta.{what}")
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            runs = self._runs(tenant, family_id, (delta.producer, tuple(chain))) if chain else []
            if runs is None:
                raise FailedPrecondition(f"delta.{what}: not every chunk is a committed entry of "
                                         f"{delta.producer!r} (put them first)")
            size += sum(nbytes for _, nbytes in runs)
        measured = AnchorDelta(delta.agent, delta.producer, delta.placeholder_hashes, delta.following_hashes,
                               delta.following_length, size)
        with self._lock:
            evicted = self.anchors.record((tenant, family_id, placeholder), key, measured)
            self._drop_entries(evicted)
            self._counters["anchor_records"] += 1
            self._counters["anchors_evicted"] += len({e.segment_key for e in evicted} - {key})
        self.anchors.flush()
        return [e.segment_key for e in evicted if e.segment_key != key]

    def find_anchors(self, tenant: str, family_id: str, placeholder: str, min_length: int) -> list[AnchorInfo]:
        tenant = tenant_name(tenant)
        pool: PoolKey = (tenant, family_id, placeholder)
        with self._lock:
            self._models.family(family_id)
            wanted = {chain for a in self.anchors.find(pool, min_length) for chain, _ in _chains_of(a)}
            held = self._held_here(tenant, family_id, wanted)
        held = self._ask_cluster(tenant, family_id, held)
        with self._lock:
            found = []
            for anchor in self.anchors.find(pool, min_length):
                verdicts = [_covers(held, chain, end) for chain, end in _chains_of(anchor)]
                if all(v is True for v in verdicts):
                    found.append(anchor)
                    continue
                if any(v is None for v in verdicts) and not any(v is False for v in verdicts):
                    continue      # the cluster could not be asked: neither handed out nor dropped
                dropped = self.anchors.drop(pool, anchor.segment_key)
                self._drop_entries([dropped] if dropped else [])
                self._counters["anchors_stale"] += 1
                self._counters["anchors_evicted"] += 1
            self._counters["anchor_finds"] += 1
        self.anchors.flush()
        return found

    def activate(self, tenant: str, family_id: str, placeholder: str, keys: Sequence[bytes]) -> int:
        tenant = tenant_name(tenant)
        with self._lock:
            n = self.anchors.activate((tenant, family_id, placeholder), [bytes(k) for k in keys])
        self.anchors.flush()
        return n

    def gauges(self) -> dict[str, int]:
        """Under the store lock."""
        return {"segment_sources": self.segments.count, "anchors": self.anchors.count(),
                "anchor_pool_bytes": self.anchors.used_bytes}

    def close(self) -> None:
        self.anchors.flush()
        self._flush_segments()

    def _flush_segments(self) -> None:
        """Write the segment index's queued changes, outside the store lock; one writer at
        a time, in the order they were taken (journal lock, then store lock: never the
        other way round)."""
        with self._journal_lock:
            with self._lock:
                lines, snapshot = self.segments.take()
            self.segments.write(lines, snapshot)

    # ------------------------------------------------------------ checks (under the lock)

    def _check_producer(self, tenant: str, family_id: str, producer: str, what: str) -> None:
        family = self._models.family(family_id)                # NotFound for an unknown family
        model = self._models.get(producer, tenant=tenant)      # NotFound for an unknown model
        if model.family_id != family_id:
            raise FailedPrecondition(f"{what} {producer!r} is of family {model.family_id[:12]}, not "
                                     f"{family_id[:12]} ({family.architecture}): its K/V cannot be reused here")

    def _check_source(self, tenant: str, family_id: str, source: SegmentSource, what: str) -> None:
        self._check_producer(tenant, family_id, source.producer, f"{what}.producer")
        try:
            check_chunk_hashes(source.chunk_hashes, f"{what}.chunk_hashes")
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not source.chunk_hashes or source.length < 1:
            raise InvalidArgument(f"{what} needs chunk hashes and a length >= 1")
        if len(source.prefix_tokens) % 4 or len(source.prefix_tokens) > 4 * MAX_PREFIX_TOKENS:
            raise InvalidArgument(f"{what}.prefix_tokens must be at most {MAX_PREFIX_TOKENS} u32 tokens")
        if source.normalized and (source.offset or source.prefix_tokens):
            raise InvalidArgument(f"{what}: a normalized copy starts at offset 0 with no prefix")

    @staticmethod
    def _check_span(source: SegmentSource, runs: Runs | None, what: str) -> None:
        if runs is None:
            raise FailedPrecondition(f"{what}: not every chunk of its chain is a committed entry of "
                                     f"{source.producer!r} (put the prompt first)")
        held = sum(tokens for tokens, _ in runs)
        if source.end > held:
            raise InvalidArgument(f"{what} spans tokens [{source.offset}, {source.end}) but its chain holds {held}")

    # ------------------------------------------------------------ chains: here, then the cluster

    def _runs(self, tenant: str, family_id: str, chain: Chain) -> Runs | None:
        """Not under the lock: the chain's runs from this node's entries, else from the
        cluster's index (Unavailable when it cannot be asked); None when a chunk is missing."""
        with self._lock:
            runs = self._runs_here(tenant, family_id, chain)
        if runs is None and self.remote is not None:
            runs = self.remote(tenant, family_id, chain[1], chain[0])
        return runs

    def _runs_here(self, tenant: str, family_id: str, chain: Chain) -> Runs | None:
        recs = self._chain(tenant, family_id, chain[1], chain[0])
        return None if recs is None else [(r.meta.num_tokens, r.meta.size_bytes) for r in recs]

    def _held_here(self, tenant: str, family_id: str, chains: set[Chain]) -> dict[Chain, int | None]:
        """Under the lock: tokens each chain holds on this node (None: not whole here)."""
        out = {}
        for chain in chains:
            runs = self._runs_here(tenant, family_id, chain)
            out[chain] = None if runs is None else sum(t for t, _ in runs)
        return out

    def _ask_cluster(self, tenant: str, family_id: str, held: dict[Chain, int | None]) -> dict:
        """Not under the lock: the chains not whole here, asked of the cluster: tokens held,
        None (missing: stale) or UNKNOWN (the index could not be asked)."""
        if self.remote is None:
            return held
        out = dict(held)
        for chain in [c for c, tokens in held.items() if tokens is None]:
            try:
                runs = self.remote(tenant, family_id, chain[1], chain[0])
            except Unavailable:
                out[chain] = UNKNOWN
                continue
            out[chain] = None if runs is None else sum(t for t, _ in runs)
        return out

    def _liveness(self, tenant: str, family_id: str, held: dict[Chain, int | None]) -> Callable:
        """The segment index's verdict on a source: True (live), False (stale: dropped),
        None (could not be checked: kept, not handed out). A source put since ``held`` was
        taken is checked here, under the lock, or kept unchecked in a cluster."""
        known = self._ask_cluster(tenant, family_id, held)

        def live(source: SegmentSource) -> bool | None:
            chain = _chain(source)
            if chain not in known:
                tokens = self._held_here(tenant, family_id, {chain})[chain]
                if tokens is None and self.remote is not None:
                    return None
                known[chain] = tokens
            return _covers(known, chain, source.end)
        return live

    def _chain(self, tenant: str, family_id: str, hashes: Sequence[bytes], producer: str) -> list[EntryRecord] | None:
        """The producer's newest record of each chunk, or None if one is missing."""
        by_hash = self._catalog.chunks.get((tenant, family_id), {})
        out = []
        for h in hashes:
            recs = by_hash.get(bytes(h), {}).get(producer)
            if not recs:
                return None
            out.append(recs[-1])
        return out

    def _drop_entries(self, evicted: Sequence[Evicted]) -> None:
        for gone in evicted:
            tenant, family_id, _ = gone.pool
            for delta in gone.deltas:
                for chain in delta.chains():
                    self._delete(tenant, family_id, chain, delta.producer)


def _chain(source: SegmentSource) -> Chain:
    return source.producer, tuple(source.chunk_hashes)


def _chains_of(anchor: AnchorInfo) -> list[tuple[Chain, int]]:
    """The chains an anchor needs, each with the tokens it must hold: its base's span, and
    every delta's offsets (whole entries)."""
    return [(_chain(anchor.base), anchor.base.end)] + [
        ((d.producer, tuple(c)), 1) for d in anchor.deltas.values() for c in d.chains()]


def _covers(held: dict, chain: Chain, end: int) -> bool | None:
    """Whether ``chain`` holds tokens up to ``end``: None when it could not be checked."""
    tokens = held.get(chain, UNKNOWN)       # a chain added since the check: not checked
    if tokens == UNKNOWN:
        return None
    return tokens is not None and tokens >= end


def _check_key(key: bytes) -> None:
    if len(key) != CHUNK_HASH_BYTES:
        raise InvalidArgument(f"segment_key must be {CHUNK_HASH_BYTES} bytes (wire.keys.segment_key), "
                              f"got {len(key)}")
