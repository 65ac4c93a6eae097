"""Re-replication and rebalancing: after the cluster's membership changes, every entry this
node holds is copied to the nodes its placement now names and that lack it.

One node acts per entry: the live holder the entry's chunk hash weighs highest among
its holders (rendezvous again), so a lost replica is recreated once, not by every
survivor. Copies go through the target's own two-phase put (Reserve, WriteSlabs,
Commit), so the target verifies every slab's checksum and publishes the entry only when
whole, exactly as a client's put (this node reads through the store's read path, which
verifies disk bytes and quarantines a rotten file). A token bucket bounds the bytes per second, so a node
joining or leaving does not take the data plane from the clients.

Extra replicas (a node that is no longer in an entry's placement) are left to the
tiers' LRU: dropping them would save space but cost a window with fewer copies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from cachesvc.node.entries import EntryMeta
from cachesvc.node.logs import Throttled
from cachesvc.node.store import CacheStore
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.v1 import cachesvc_pb2_grpc as pb_grpc
from cachesvc.wire.cluster import ClusterIndex, IndexRecord, Member, rendezvous
from cachesvc.wire.errors import NotFound

log = logging.getLogger(__name__)

HOLDERS_BATCH = 256          # index reads per pipeline while checking holders
WRITE_PIECE = 1 << 20        # bytes per WriteChunk message


class TokenBucket:
    """At most ``rate`` bytes per second on average, bursts up to one second's worth."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        self.rate = rate_bytes_per_s
        self._tokens = rate_bytes_per_s
        self._at = time.monotonic()

    def take(self, size: int, stop: threading.Event) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= min(size, self.rate):
                self._tokens -= size
                return
            if stop.wait((min(size, self.rate) - self._tokens) / self.rate):
                return


class Replicator:
    """Runs a pass over this node's entries each time :meth:`schedule` is called (passes
    coalesce). ``copied``, ``bytes_copied`` and ``failures`` count what it did."""

    def __init__(self, store: CacheStore, index: ClusterIndex, node_id: str, replication: int,
                 rate_bytes_per_s: float, timeout_s: float = 30.0, token: str = "") -> None:
        self.store = store
        self.index = index
        self.node_id = node_id
        self.replication = replication
        self.bucket = TokenBucket(rate_bytes_per_s)
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()   # peers with API tokens
        self.copied = self.bytes_copied = self.failures = self.passes = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._channels: dict[str, grpc.Channel] = {}
        self._errors = Throttled(log, 6)
        self._thread = threading.Thread(target=self._run, name="replicator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        for channel in self._channels.values():
            channel.close()

    def schedule(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.run_pass()
            except Exception as exc:   # noqa: BLE001 - Redis or a peer failed: the next change retries
                self._errors.info("replication pass failed", error=f"{type(exc).__name__}: {exc}")

    def run_pass(self) -> int:
        """One pass; returns entries copied."""
        members = self.index.members(fresh=True)
        live = sorted(members)
        if self.node_id not in members:
            return 0            # not (or no longer) a member: nothing is placed here
        copied = 0
        for meta, holders in self._holders(members):
            if self._stop.is_set():
                break
            if rendezvous(meta.chunk_hash, holders, 1) != [self.node_id]:
                continue        # another holder leads this entry
            for target in rendezvous(meta.chunk_hash, live, self.replication):
                if target not in holders and self._copy(meta, members[target]):
                    copied += 1
        self.passes += 1
        if copied:
            log.info("replicated", extra={"entries": copied, "bytes": self.bytes_copied})
        return copied

    def _holders(self, members: dict[str, Member]) -> Iterator[tuple[EntryMeta, list[str]]]:
        """Every entry this node holds, with the live nodes the index says hold it (this
        one included)."""
        entries = [meta for meta, _tier in self.store.indexed_entries()]
        keys = self.index.keys
        for at in range(0, len(entries), HOLDERS_BATCH):
            batch = entries[at:at + HOLDERS_BATCH]
            pipe = self.index.client.pipeline(transaction=False)
            for meta in batch:
                pipe.hgetall(keys.chunk(meta.tenant, meta.family_id, meta.chunk_hash))
            for meta, row in zip(batch, pipe.execute(), strict=True):
                holders = {self.node_id}
                for field, value in row.items():
                    try:
                        rec = IndexRecord.parse(field, value)
                    except (ValueError, TypeError):
                        continue
                    member = members.get(rec.node_id)
                    if rec.entry_id == meta.entry_id and member is not None and \
                            member.incarnation == rec.incarnation:
                        holders.add(rec.node_id)
                yield meta, sorted(holders)

    def _copy(self, meta: EntryMeta, target: Member) -> bool:
        # The weights first, then the bytes: a replace in between drops the entry, so the
        # read fails; a replace after it leaves bytes and digest consistent. The target
        # refuses them unless the digest is its producer's (both at reserve and at commit).
        try:
            digest = self.store.get_model(meta.producer, meta.tenant).weights_digest
        except NotFound:
            return False
        payload = self.store.entry_payload(meta)
        if payload is None:
            return False        # evicted or deleted meanwhile, or rotten on disk
        self.bucket.take(len(payload), self._stop)
        stub = pb_grpc.CacheServiceStub(self._channel(target.grpc_address))
        spec = pb.EntrySpec(chunk_hash=meta.chunk_hash, position_offset=meta.position_offset,
                            num_tokens=meta.num_tokens, parent_hash=meta.parent_hash,
                            slabs=[pb.SlabSpec(kind=int(s.kind), layer=s.layer, shape=s.shape, dtype=int(s.dtype),
                                               checksum=s.checksum) for s in meta.slabs])
        try:
            call = {"timeout": self.timeout_s, "metadata": self._metadata}
            res = stub.Reserve(pb.ReserveRequest(tenant=meta.tenant, family_id=meta.family_id,
                                                 producer=meta.producer, entries=[spec],
                                                 producer_digest=digest), **call)
            if res.targets[0].already_present:
                return False
            if list(res.targets[0].slab_offsets) != [s.offset for s in meta.slabs]:
                stub.Abort(pb.AbortRequest(reservation_id=res.reservation_id), **call)
                raise ValueError(f"{target.node_id} lays the entry out differently")
            pieces = (pb.WriteChunk(reservation_id=res.reservation_id, entry_index=0, offset=off,
                                    data=payload[off:off + WRITE_PIECE])
                      for off in range(0, len(payload), WRITE_PIECE))
            stub.WriteSlabs(pieces, **call)
            stub.Commit(pb.CommitRequest(reservation_id=res.reservation_id), **call)
        except (grpc.RpcError, ValueError) as exc:
            self.failures += 1     # an open reservation left behind expires on the target
            detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            self._errors.info("replication copy failed", target=target.node_id, error=detail)
            return False
        self.copied += 1
        self.bytes_copied += len(payload)
        return True

    def _channel(self, address: str) -> grpc.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.insecure_channel(
                address, options=[("grpc.max_send_message_length", 64 << 20)])
        return channel
