"""The anchor pool of cross-context reuse (KVCOMM, ALGORITHMS.md), one pool per (tenant,
family, placeholder). Part of the store, which owns the lock: every method runs under it.

An anchor is content whose base K/V (a segment source, shared, not counted here) and whose
per-agent offsets ΔPH / ΔPF (entries of the agent's model, owned by the pool) let a
connector estimate the offsets of other content in that placeholder. The pool keeps:

- at most ``per_pool`` anchors per placeholder (KVCOMM's 20); admitting one more evicts
  the least activated of the ``oldest`` (5) oldest;
- at most ``budget_bytes`` of delta entries over every pool: recording a delta that would
  exceed it evicts anchors, the same way, from the whole store, until it fits (never the
  anchor being recorded); a delta larger than the budget alone is refused;
- its state in ``anchors.json`` with the disk tier, so anchors come back after a restart
  with the entries they name.

Which content becomes an anchor (KVCOMM's entropy rule) is the connector's decision: it
needs the tensors. The pool only keeps what it is told, within its bounds, and says what it
evicted; the store deletes the evicted deltas' entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cachesvc.node.jsonfile import JsonFile
from cachesvc.wire.errors import InvalidArgument, NotFound, ResourceExhausted
from cachesvc.wire.segments import AnchorDelta, AnchorInfo, SegmentSource

PoolKey = tuple[str, str, str]       # (tenant, family_id, placeholder)
MAX_PLACEHOLDER = 256                # bytes of a placeholder name


@dataclass(frozen=True, slots=True)
class Evicted:
    """An anchor that left its pool, and the delta chains to delete with it."""

    pool: PoolKey
    segment_key: bytes
    deltas: tuple[AnchorDelta, ...]


class AnchorPool:
    """Invariant: ``used_bytes`` is the sum of every anchor's delta sizes and never exceeds
    ``budget_bytes``; each pool holds at most ``per_pool`` anchors."""

    def __init__(self, budget_bytes: int, path: Path | None = None, per_pool: int = 20, oldest: int = 5) -> None:
        self.budget_bytes, self.per_pool, self.oldest = budget_bytes, per_pool, oldest
        self.pools: dict[PoolKey, dict[bytes, AnchorInfo]] = {}
        self.used_bytes = 0
        self._seq = 0
        self._file = JsonFile(path)
        self._load()

    # ------------------------------------------------------------ queries

    def find(self, key: PoolKey, min_length: int) -> list[AnchorInfo]:
        """The pool's anchors at least ``min_length`` tokens long, oldest first (copies)."""
        pool = self.pools.get(key, {})
        return [replace(a, deltas=dict(a.deltas)) for a in sorted(pool.values(), key=lambda a: a.admitted_seq)
                if a.length >= min_length]

    def count(self) -> int:
        return sum(len(p) for p in self.pools.values())

    # ------------------------------------------------------------ changes

    def admit(self, key: PoolKey, segment_key: bytes, length: int, base: SegmentSource) -> tuple[bool, list[Evicted]]:
        """Make the content an anchor of ``key``'s pool (False if it is one already)."""
        _check_placeholder(key[2])
        if length < 1 or not base.chunk_hashes:
            raise InvalidArgument("an anchor needs a length >= 1 and a base source with chunk hashes")
        pool = self.pools.setdefault(key, {})
        if segment_key in pool:
            return False, []
        evicted = []
        while len(pool) >= self.per_pool:
            evicted.append(self._evict(self._victim(pool.values())))
        self._seq += 1
        pool[segment_key] = AnchorInfo(segment_key, length, base, admitted_seq=self._seq)
        self._stage()
        return True, evicted

    def record(self, key: PoolKey, segment_key: bytes, delta: AnchorDelta) -> list[Evicted]:
        """Set one agent's offsets (``delta.size_bytes`` measured by the store). Returns
        what left the pool, each with the offsets whose entries to delete: anchors evicted
        to stay in budget, and, as this anchor's own, offsets of its other agents dropped
        for the budget and the ones this delta replaced (unless they are the same chains)."""
        anchor = self.pools.get(key, {}).get(segment_key)
        if anchor is None:
            raise NotFound(f"no anchor {segment_key.hex()[:16]} in pool {key[2]!r}: admit it first "
                           "(it may have been evicted)")
        if delta.size_bytes > self.budget_bytes:
            raise ResourceExhausted(f"anchor delta of {delta.size_bytes} bytes exceeds the pool's budget "
                                    f"({self.budget_bytes} bytes, --anchor-pool-bytes)")
        old = anchor.deltas.pop(delta.agent, None)
        self.used_bytes -= old.size_bytes if old else 0
        evicted = [Evicted(key, segment_key, (old,))] if old is not None and old.chains() != delta.chains() else []
        while self.used_bytes + delta.size_bytes > self.budget_bytes:
            others = [a for p in self.pools.values() for a in p.values() if a is not anchor and a.deltas]
            if not others:
                break
            evicted.append(self._evict(self._victim(others)))
        if self.used_bytes + delta.size_bytes > self.budget_bytes:   # only this anchor's other agents left
            for agent in sorted(anchor.deltas, key=lambda a: anchor.deltas[a].size_bytes, reverse=True):
                dropped = anchor.deltas.pop(agent)
                self.used_bytes -= dropped.size_bytes
                evicted.append(Evicted(key, segment_key, (dropped,)))
                if self.used_bytes + delta.size_bytes <= self.budget_bytes:
                    break
        anchor.deltas[delta.agent] = delta
        self.used_bytes += delta.size_bytes
        self._stage()
        return evicted

    def activate(self, key: PoolKey, segment_keys: Iterable[bytes]) -> int:
        pool = self.pools.get(key, {})
        hits = 0
        for k in segment_keys:
            if k in pool:
                pool[k].activations += 1
                hits += 1
        if hits:
            self._stage()
        return hits

    def drop(self, key: PoolKey, segment_key: bytes) -> Evicted | None:
        """Remove a stale anchor (its base is gone)."""
        anchor = self.pools.get(key, {}).get(segment_key)
        return self._evict((key, anchor)) if anchor is not None else None

    def flush(self) -> None:
        """Write the staged state (call without the store lock)."""
        self._file.flush()

    # ------------------------------------------------------------ internals

    def _victim(self, anchors: Iterable[AnchorInfo]) -> tuple[PoolKey, AnchorInfo]:
        """KVCOMM's rule: the least activated of the ``oldest`` oldest (the oldest on ties)."""
        oldest = sorted(anchors, key=lambda a: a.admitted_seq)[:self.oldest]
        victim = min(oldest, key=lambda a: (a.activations, a.admitted_seq))
        return next((k, victim) for k, p in self.pools.items() if p.get(victim.segment_key) is victim)

    def _evict(self, found: tuple[PoolKey, AnchorInfo]) -> Evicted:
        key, anchor = found
        del self.pools[key][anchor.segment_key]
        if not self.pools[key]:
            del self.pools[key]
        self.used_bytes -= anchor.size_bytes
        self._stage()
        return Evicted(key, anchor.segment_key, tuple(anchor.deltas.values()))

    def _stage(self) -> None:
        self._file.stage({"seq": self._seq, "pools": [
            {"tenant": k[0], "family": k[1], "placeholder": k[2], "anchors": [_anchor_json(a) for a in p.values()]}
            for k, p in self.pools.items()]})

    def _load(self) -> None:
        doc = self._file.read()
        if not isinstance(doc, dict):
            return
        self._seq = int(doc.get("seq", 0))
        for pool in doc.get("pools", ()):
            key = (pool["tenant"], pool["family"], pool["placeholder"])
            self.pools[key] = {a.segment_key: a for a in map(_anchor_of, pool["anchors"])}
        self.used_bytes = sum(a.size_bytes for p in self.pools.values() for a in p.values())


def _check_placeholder(name: str) -> None:
    if not name or len(name.encode()) > MAX_PLACEHOLDER:
        raise InvalidArgument(f"placeholder must be a non-empty name of at most {MAX_PLACEHOLDER} bytes")


def _hexes(hashes: Iterable[bytes]) -> list[str]:
    return [h.hex() for h in hashes]


def _unhex(values: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(bytes.fromhex(v) for v in values)


def _anchor_json(a: AnchorInfo) -> dict:
    b = a.base
    return {"key": a.segment_key.hex(), "length": a.length, "activations": a.activations, "seq": a.admitted_seq,
            "base": {"producer": b.producer, "chunks": _hexes(b.chunk_hashes), "offset": b.offset,
                     "length": b.length, "prefix": b.prefix_tokens.hex(), "normalized": b.normalized},
            "deltas": [{"agent": d.agent, "producer": d.producer, "ph": _hexes(d.placeholder_hashes),
                        "pf": _hexes(d.following_hashes), "pf_length": d.following_length, "bytes": d.size_bytes}
                       for d in a.deltas.values()]}


def _anchor_of(d: dict) -> AnchorInfo:
    b = d["base"]
    base = SegmentSource(b["producer"], _unhex(b["chunks"]), b["offset"], b["length"], bytes.fromhex(b["prefix"]),
                         b.get("normalized", False))
    deltas = {x["agent"]: AnchorDelta(x["agent"], x["producer"], _unhex(x["ph"]), _unhex(x["pf"]),
                                      x["pf_length"], x["bytes"]) for x in d["deltas"]}
    return AnchorInfo(bytes.fromhex(d["key"]), d["length"], base, deltas, d["activations"], d["seq"])
