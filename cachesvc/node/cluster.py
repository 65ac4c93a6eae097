"""A node's part in a cluster: its membership, its entries in the global index, and the
models every node shares (schema: cachesvc.wire.cluster, docs/cluster.md).

The store's catalog reports every entry that enters or leaves the lookup index (under
the store lock, so it only appends to a deque); one thread here turns those reports into
pipelined Redis writes and heart-beats. Redis never blocks the store: while it is down
the node serves its own entries, says so in health and stats, and queues nothing (the
queue is dropped); when Redis answers again, the node takes a new incarnation and
republishes what it holds, which is also how an index lost with a restarted Redis is
rebuilt: every node does it within one heartbeat interval.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachesvc.node.entries import EntryMeta
from cachesvc.node.logs import Throttled
from cachesvc.node.store import CacheStore
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.wire.cluster import (ClusterHit, ClusterIndex, IndexRecord, Keys, Member, connect, held_member,
                                   index_field, model_field, profile_field, redis_now_ms, split_field,
                                   split_held_member)
from cachesvc.wire.errors import FailedPrecondition, Unavailable
from cachesvc.wire.convert import family_from_proto, family_to_proto
from cachesvc.node.models import RegisterOutcome
from cachesvc.node.profiles import ProfileRecord
from cachesvc.node.records import tenant_name
from cachesvc.node.replicator import Replicator
from cachesvc.wire.keys import FamilyId, FamilySpec, Tier, chain_root

log = logging.getLogger(__name__)

PUBLISH_BATCH = 512            # index writes per pipeline
STALE_MEMBER_FACTOR = 10       # members expired this many TTLs ago are removed from the hash


class ClusterRefused(FailedPrecondition):
    """This node cannot join the cluster as configured (its node id is a live member's at
    another address, or its chunk size is not the cluster's)."""


@dataclass(slots=True)
class ClusterStatus:
    redis_up: bool = False
    incarnation: int = 0
    members: int = 0
    published: int = 0         # index writes sent (adds and removals)
    resyncs: int = 0           # full republishes (start, and after Redis came back)


class ClusterAgent:
    """Keeps this node in the cluster. ``on_health(up)`` is told when Redis comes and goes."""

    def __init__(self, store: CacheStore, fetch: pb.FetchDescriptor, redis_url: str, namespace: str,
                 heartbeat_ttl_s: float, on_health: Callable[[bool], None] = lambda up: None,
                 replication: int = 0, rebalance_bytes_per_s: float = 64 << 20, peer_token: str = "") -> None:
        if heartbeat_ttl_s <= 0:
            raise ValueError("heartbeat TTL must be > 0")
        self.store = store
        self.fetch = fetch
        self.node_id = fetch.node_id
        self.ttl_ms = int(heartbeat_ttl_s * 1000)
        self.redis = connect(redis_url)
        self.keys = Keys(namespace)
        self.index = ClusterIndex(self.redis, namespace)
        self.status = ClusterStatus()
        self._on_health = on_health
        self._events: collections.deque[tuple[bool, EntryMeta, Tier]] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._dirty = True              # Redis may not hold what this node holds: resync
        self._thread = threading.Thread(target=self._run, name="cluster", daemon=True)
        self._errors = Throttled(log, 6)
        self._models_version: bytes | None = None
        self._publishing = threading.Lock()
        self._live: frozenset[str] = frozenset()
        self.replicator = Replicator(store, self.index, self.node_id, replication, rebalance_bytes_per_s,
                                     token=peer_token) if replication else None

    # ------------------------------------------------------------ store hooks

    def entry_indexed(self, meta: EntryMeta, tier: Tier) -> None:
        """Called under the store lock: O(1)."""
        self._events.append((True, meta, tier))
        self._wake.set()

    def entry_unindexed(self, meta: EntryMeta) -> None:
        self._events.append((False, meta, Tier.MEMORY))
        self._wake.set()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.store.catalog_listener(self.entry_indexed, self.entry_unindexed)
        self.store.cross.remote = self.chain_runs     # segments and anchors over chains held anywhere
        if self.replicator is not None:
            self.replicator.start()
        self._tick()                    # join before serving, when Redis is there
        self._thread.start()

    def stop(self) -> None:
        """Leave the cluster at once (readers stop counting this node without waiting
        for its heartbeat to expire)."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        if self.replicator is not None:
            self.replicator.stop()
        try:
            self.redis.hdel(self.keys.nodes, self.node_id)
        except Exception:   # noqa: BLE001 - Redis down: the heartbeat expires on its own
            pass
        self.redis.close()

    def _run(self) -> None:
        interval = self.ttl_ms / 3000
        while not self._stop.is_set():
            self._wake.wait(interval)      # every queued event sets it
            self._wake.clear()
            if not self._stop.is_set():
                self._tick()

    def _tick(self) -> None:
        try:
            if self._dirty:
                self._resync()
            self._drain()
            self._heartbeat()
            self._set_up(True)
        except ClusterRefused as exc:   # out of the cluster, serving its own entries, until it may join
            self._events.clear()
            self._dirty = True
            self._set_up(False)
            self._errors.info("cluster: not joining", reason=str(exc))
        except Exception as exc:   # noqa: BLE001 - any Redis failure: keep serving, resync later
            self._events.clear()    # lost with Redis: the resync republishes from the catalog
            self._dirty = True
            self._set_up(False)
            self._errors.info("cluster: Redis unavailable", error=f"{type(exc).__name__}: {exc}")

    def _set_up(self, up: bool) -> None:
        if up != self.status.redis_up:
            self.status.redis_up = up
            log.info("cluster: Redis " + ("reachable" if up else "unreachable; serving own entries only"))
            self._on_health(up)

    # ------------------------------------------------------------ publishing

    def _resync(self) -> None:
        """Publish every entry held under a new incarnation, then switch the membership
        to it: readers go from the old set of fields to the new one in one write."""
        self.check_identity()
        incarnation = redis_now_ms(self.redis)
        self._adopt_models()
        self._adopt_profiles()
        self._publish_profiles([rec for rec, _stale in self.store.list_profiles(tenant=None)], overwrite=False)
        with self._publishing:
            self._events.clear()       # the snapshot below supersedes what was queued
            snapshot = self.store.indexed_entries()
            self.status.incarnation = incarnation
            written = self._write((True, meta, tier) for meta, tier in snapshot)
            self._announce()
            self._dirty = False
            stale = self._clean(self.node_id, keep=written)   # fields of entries gone while Redis lost track
        self.status.resyncs += 1
        log.info("cluster: joined", extra={"node_id": self.node_id, "incarnation": incarnation,
                                           "entries": len(snapshot), "stale_fields_removed": stale})

    def check_identity(self) -> None:
        """:func:`check_identity` for this node (ClusterRefused when it must not join)."""
        check_identity(self.redis, self.keys, self.node_id, self.fetch.grpc_address, self.store.config.chunk_size)

    def flush(self) -> None:
        """Publish what is queued now, in the caller's thread: a Commit returns only once
        its entries are in the global index (read-your-writes from any node). Redis down:
        the entries stay local, and the resync publishes them."""
        if not self.status.redis_up:
            return
        try:
            self._drain()
        except Exception as exc:   # noqa: BLE001 - the agent's thread resyncs
            self._dirty = True
            self._wake.set()
            self._errors.info("cluster: publish failed", error=f"{type(exc).__name__}: {exc}")

    def _drain(self) -> None:
        with self._publishing:          # the agent's thread and committing RPCs, one at a time
            batch = []
            while self._events:
                batch.append(self._events.popleft())
            if batch:
                self._write(batch)

    def _write(self, events) -> set[bytes]:
        """Apply index events; returns the (key, field) places written, as the node's
        ``held`` set spells them. Every field written is also added to that set (and
        removed with it), so what a node leaves behind can be found and cleaned: by
        itself at its next resync, by the others once it is gone for good."""
        pipe = self.redis.pipeline(transaction=False)
        held = self.keys.held(self.node_id)
        pending, written = 0, set()
        incarnation = self.status.incarnation
        digests = {(m.tenant, m.model_id): m.weights_digest for m in self.store.list_models(None)}
        for add, meta, tier in events:
            field = index_field(meta.producer, self.node_id, meta.entry_id)
            places = [(self.keys.chunk(meta.tenant, meta.family_id, meta.chunk_hash), None)]
            if meta.parent_hash:            # a partial chunk: offered after its parent too
                places.append((self.keys.tails(meta.tenant, meta.family_id, meta.parent_hash), meta.chunk_hash))
            for key, chunk_hash in places:
                place = held_member(key, field)
                if add:
                    rec = IndexRecord(meta.producer, self.node_id, meta.entry_id, meta.position_offset, meta.layout,
                                      tier, digests.get((meta.tenant, meta.producer), "-"), incarnation,
                                      chunk_hash or b"")
                    pipe.hset(key, field, rec.value())
                    pipe.sadd(held, place)
                    written.add(place)
                else:
                    pipe.hdel(key, field)
                    pipe.srem(held, place)
            pending += 1
            if pending >= PUBLISH_BATCH:
                pipe.execute()
                self.status.published += pending
                pending = 0
        if pending:
            pipe.execute()
            self.status.published += pending
        return written

    def _clean(self, node_id: str, keep: set[bytes] = frozenset()) -> int:
        """Delete the index fields ``node_id`` wrote, except ``keep``; how many."""
        held = self.keys.held(node_id)
        doomed = [m for m in self.redis.smembers(held) if m not in keep]
        for at in range(0, len(doomed), PUBLISH_BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for place in doomed[at:at + PUBLISH_BATCH]:
                key, field = split_held_member(place)
                pipe.hdel(key, field)
                pipe.srem(held, place)
            pipe.execute()
        return len(doomed)

    def _heartbeat(self) -> None:
        """Extend this node's membership. A membership missing, or of another incarnation,
        means Redis lost it (restarted, flushed) and with it this node's index fields:
        resync at once (after :func:`check_identity`: a second process that took this
        node id since, at another address, keeps it, and this node leaves the cluster)."""
        current = self.redis.hget(self.keys.nodes, self.node_id)
        if current is None or Member.from_json(current).incarnation != self.status.incarnation:
            self._errors.info("cluster: membership lost from Redis; republishing", node_id=self.node_id)
            self._resync()
            return
        self._announce()
        live = frozenset(self.index.members(fresh=True))
        self.status.members = len(live)
        if live != self._live and self.replicator is not None:
            self.replicator.schedule()  # a member came or went: re-replicate, rebalance
        self._live = live
        version = self.redis.get(self.keys.models_version)
        if version != self._models_version:
            self._adopt_models()        # registered, replaced or profiled through another node since
            self._adopt_profiles()
            self._models_version = version
        self._forget_dead()

    def _announce(self) -> None:
        """Write this node's membership (expiring one TTL from now by Redis's clock) and
        the models it knows that the cluster does not."""
        member = Member(self.node_id, self.fetch.grpc_address, self.fetch.host_id, self.status.incarnation,
                        redis_now_ms(self.redis) + self.ttl_ms, dict(self.fetch.transports))
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.nodes, self.node_id, member.to_json())
        for model in self.store.list_models(None):
            pipe.hsetnx(self.keys.models, model_field(model.tenant, model.model_id),
                        json.dumps(_model_doc(model.weights_digest, model.family), sort_keys=True))
        pipe.execute()

    def _forget_dead(self) -> None:
        """Forget members gone for ten TTLs (or unparsable), as the membership read the
        heartbeat just did found them: their index fields first, then the member.
        Several nodes may do this at once: every step is idempotent."""
        for node_id, expired_ms in self.index.gone.items():
            if expired_ms < 0 or expired_ms > STALE_MEMBER_FACTOR * self.ttl_ms:
                dead = node_id.decode() if isinstance(node_id, bytes) else node_id
                removed = self._clean(dead)
                self.redis.hdel(self.keys.nodes, node_id)
                log.info("cluster: forgot a dead node", extra={"node_id": dead, "fields_removed": removed})

    # ------------------------------------------------------------ models

    def register_model(self, model_id: str, weights_digest: str, family: FamilySpec,
                       replace: bool, tenant: str = "") -> RegisterOutcome:
        """Register cluster-wide: the cluster's registry (Redis) decides as a node's own
        would (same id, other weights: FAILED_PRECONDITION unless ``replace``); then this
        node registers it and publishes it for the others to adopt. With Redis down, this
        node's registry alone decides (its resync publishes the model later)."""
        tenant = tenant_name(tenant)
        field_ = model_field(tenant, model_id)
        try:
            raw = self.redis.hget(self.keys.models, field_)
        except Exception:   # noqa: BLE001 - Redis down: decide locally
            return self.store.register_model(model_id, weights_digest, family, replace, tenant)
        mine = _model_doc(weights_digest.lower(), family)
        if raw is not None and json.loads(raw) != mine and not replace:
            raise FailedPrecondition(f"model {model_id!r} is registered in the cluster with other weights or "
                                     "family; pass replace=true to replace it everywhere (and drop its entries)")
        outcome = self.store.register_model(model_id, weights_digest, family, replace or raw is not None, tenant)
        try:
            pipe = self.redis.pipeline(transaction=False)
            if replace:
                pipe.hset(self.keys.models, field_, json.dumps(mine, sort_keys=True))
            else:
                pipe.hsetnx(self.keys.models, field_, json.dumps(mine, sort_keys=True))
            pipe.incr(self.keys.models_version)
            pipe.execute()
        except Exception as exc:   # noqa: BLE001 - registered here; published with the next resync
            self._dirty = True
            self._errors.info("cluster: model not published", model_id=model_id, error=str(exc))
        if outcome.replaced is not None:
            self.flush()                # the dropped entries leave the index before the caller hears back
        return outcome

    def put_profile(self, producer: str, consumer: str, producer_digest: str, consumer_digest: str,
                    document: bytes, tenant: str = "") -> ProfileRecord:
        """Store a pair's profile here and publish it for the other nodes to adopt (the
        newest put anywhere wins; Redis down: here only, published at the next resync)."""
        rec = self.store.put_profile(producer, consumer, producer_digest, consumer_digest, document, tenant)
        try:
            self._publish_profiles([rec], overwrite=True)
        except Exception as exc:   # noqa: BLE001
            self._dirty = True
            self._errors.info("cluster: profile not published", producer=producer, consumer=consumer,
                              error=str(exc))
        return rec

    def _publish_profiles(self, records, overwrite: bool) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for rec in records:
            doc = json.dumps({"producer_digest": rec.producer_digest, "consumer_digest": rec.consumer_digest,
                              "document": rec.document.decode()}, sort_keys=True)
            (pipe.hset if overwrite else pipe.hsetnx)(self.keys.profiles,
                                                      profile_field(rec.tenant, rec.producer, rec.consumer), doc)
        pipe.incr(self.keys.models_version)
        pipe.execute()

    def _adopt_profiles(self) -> None:
        """Take every profile the cluster holds that differs from this node's."""
        local = {(rec.tenant, rec.producer, rec.consumer): rec for rec, _stale in self.store.list_profiles(tenant=None)}
        for pair, raw in self.redis.hgetall(self.keys.profiles).items():
            try:
                tenant, producer, consumer = split_field(pair, 3)
                doc = json.loads(raw)
                have = local.get((tenant, producer, consumer))
                if have is None or (have.producer_digest, have.consumer_digest, have.document.decode()) != \
                        (doc["producer_digest"], doc["consumer_digest"], doc["document"]):
                    self.store.put_profile(producer, consumer, doc["producer_digest"], doc["consumer_digest"],
                                           doc["document"].encode(), tenant)
            except Exception as exc:   # noqa: BLE001 - one bad record must not stop the others
                self._errors.info("cluster: profile not adopted", pair=str(pair), error=str(exc))

    def _adopt_models(self) -> None:
        """Make this node's registry the cluster's: register what it lacks, and replace
        what differs (a model replaced while this node was away; its old entries go)."""
        local = {(m.tenant, m.model_id): m for m in self.store.list_models(None)}
        for (tenant, model_id), doc in self.index.models().items():
            try:
                family = family_from_proto(pb.FamilySpec.FromString(bytes.fromhex(doc["family"])))
                have = local.get((tenant, model_id))
                if have is None or _model_doc(have.weights_digest, have.family) != doc:
                    if have is not None:
                        log.info("cluster: adopting the cluster's version of a model", extra={"model_id": model_id})
                    self.store.register_model(model_id, doc["weights_digest"], family, replace=True, tenant=tenant)
            except Exception as exc:   # noqa: BLE001 - one bad record must not stop the others
                self._errors.info("cluster: model not adopted", model_id=model_id, error=str(exc))

    # ------------------------------------------------------------ reading

    def lookup(self, tenant: str, family_id: str, hashes, producers, offer_tails: bool = False
               ) -> tuple[list[ClusterHit], dict[str, Member]]:
        """The cluster's hits for a chain (with the partial chunks offered after them), and
        the live members they name."""
        if not self.status.redis_up:
            raise Unavailable(f"node {self.node_id} has lost the cluster's Redis: it answers for its own entries "
                              "only (cluster=false), or ask another node")
        try:
            root = chain_root(tenant, FamilyId(family_id), self.store.config.chunk_size) if offer_tails else None
            hits = self.index.lookup(tenant, family_id, hashes, producers, root)
            return hits, self.index.members()
        except Exception as exc:   # noqa: BLE001 - any Redis failure is the dependency's
            raise Unavailable(f"cluster index unavailable: {type(exc).__name__}: {exc}") from None

    def chain_runs(self, tenant: str, family_id: str, hashes, producer: str) -> list[tuple[int, int]] | None:
        """Per chunk of ``producer``'s chain, (tokens, bytes) of its entry as the global
        index lists it on a live node; None when some chunk is held by none (Unavailable
        when Redis cannot be asked). The cross-context index's check for chains this node
        does not hold whole (segment sources, anchors)."""
        hits, _ = self.lookup(tenant, family_id, list(hashes), [producer])
        hit = next((h for h in hits if h.producer == producer), None)
        if hit is None or len(hit.entry_ids) < len(hashes):
            return None
        family = self.store.models.family(family_id)
        return [(lay.num_tokens, lay.payload_bytes(family)) for lay in hit.layouts]

    def members(self) -> dict[str, Member]:
        try:
            return self.index.members()
        except Exception as exc:   # noqa: BLE001
            raise Unavailable(f"cluster membership unavailable: {type(exc).__name__}: {exc}") from None

    def stats(self) -> dict[str, int]:
        s = self.status
        out = {"cluster_redis_up": int(s.redis_up), "cluster_members": s.members,
               "cluster_published": s.published, "cluster_resyncs": s.resyncs,
               "cluster_publish_queue": len(self._events), "cluster_incarnation": s.incarnation}
        if self.replicator is not None:
            r = self.replicator
            out |= {"cluster_replicated_entries": r.copied, "cluster_replicated_bytes": r.bytes_copied,
                    "cluster_replication_failures": r.failures, "cluster_replication_passes": r.passes}
        return out


def check_identity(redis: Any, keys: Keys, node_id: str, grpc_address: str, chunk_size: int) -> None:
    """ClusterRefused when a node must not join: a live member (heartbeat not yet expired)
    holds ``node_id`` at another address, so the two would overwrite each other's
    membership and index fields; or the cluster's chunk size (set by its first node) is
    not ``chunk_size``, so the node's chunk hashes would match no one's. A member of this
    id at ``grpc_address`` is the node's previous life: joining replaces it. Redis errors
    propagate (callers treat them as Redis unavailable)."""
    raw = redis.hget(keys.nodes, node_id)
    if raw is not None:
        try:
            other = Member.from_json(raw)
        except ValueError:
            other = None
        if other is not None and other.grpc_address != grpc_address:
            left_ms = other.expires_ms - redis_now_ms(redis)
            if left_ms > 0:
                raise ClusterRefused(f"node id {node_id!r} is held by a live member at {other.grpc_address} (its "
                                     f"heartbeat expires in {left_ms} ms): give this node another --node-id, "
                                     "or stop that one")
    redis.hsetnx(keys.settings, "chunk_size", str(chunk_size))
    theirs = redis.hget(keys.settings, "chunk_size")
    if theirs is not None and int(theirs) != chunk_size:
        raise ClusterRefused(f"the cluster's chunk size is {int(theirs)} tokens, this node's is {chunk_size}: its "
                             f"chunk hashes would match no other node's (start it with --chunk-size {int(theirs)})")


def refuse_to_start(redis_url: str, namespace: str, node_id: str, grpc_address: str, chunk_size: int) -> None:
    """:func:`check_identity` before a node builds anything (its store opens the disk
    tier): ClusterRefused, or nothing when Redis does not answer now (the node checks
    again when it joins)."""
    client = connect(redis_url)
    try:
        check_identity(client, Keys(namespace), node_id, grpc_address, chunk_size)
    except ClusterRefused:
        raise
    except Exception:   # noqa: BLE001 - Redis unreachable: checked again at join
        pass
    finally:
        client.close()


def _model_doc(weights_digest: str, family: FamilySpec) -> dict:
    """A model as the cluster's registry holds it (comparable as a dict)."""
    return {"weights_digest": weights_digest, "family": family_to_proto(family).SerializeToString().hex()}


def check_cluster_lookup(lease_ttl_s: int, tail_hashes, locate: bool) -> None:
    """What a cluster lookup cannot do (leases and located reads are one node's; the
    older tail probe has offers in its place)."""
    unsupported = [name for name, on in (("lease_ttl_s", lease_ttl_s), ("tail_hashes", tail_hashes),
                                         ("locate", locate)) if on]
    if unsupported:
        raise FailedPrecondition(f"a cluster lookup cannot take {', '.join(unsupported)}: look up on one node "
                                 "(cluster=false) for those")
