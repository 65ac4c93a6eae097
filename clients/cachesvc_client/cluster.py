"""One cache across a cluster of nodes (docs/cluster.md): puts go to every replica the
placement names, lookups answer from the cluster's global index, fetches go to the
nodes that hold each chunk and fall over to the next replica on any error or checksum
failure. It has the methods the connectors call on a :class:`CacheClient`, so they run
against a cluster unchanged.

Membership comes from Redis (``redis_url``) or from any node (``seeds``: the SDK then
needs no access to Redis). Per node it keeps one :class:`CacheClient` (one channel, its
data-plane transports), created on first use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from cachesvc.wire.cluster import DEFAULT_NAMESPACE, ClusterIndex, connect, rendezvous
from cachesvc.wire.keys import (NO_MODEL, ChunkHash, FamilyId, FamilySpec, Kind, ModelId, chunk_hashes, parent_of,
                                segment_key)
from cachesvc.wire.segments import AnchorDelta, AnchorInfo, SegmentSource
from cachesvc.wire.protocol import host_id
from cachesvc_client.client import CacheClient
from cachesvc_client.codec import (EntryData, Hit, LookupResult, Missing, NodeInfo, PutResult,
                                   Registered, SlabAssembler, Slabs, StoredProfile, TailOffer)
from cachesvc_client.errors import CacheServiceError, DeadlineExceededError, NotFoundError, UnavailableError
from cachesvc_client.options import ClientOptions, RetryPolicy
from cachesvc_client.prompt import verified

__all__ = ["ClusterClient", "ClusterPutResult"]

T = TypeVar("T")

# A cluster client gives up on a node quickly: another replica is there. Per-node
# defaults unless the caller's options say otherwise.
CLUSTER_OPTIONS = ClientOptions(timeout_s=2.0, io_timeout_s=2.0, retry=RetryPolicy(max_attempts=2))


@dataclass(frozen=True, slots=True)
class ClusterPutResult:
    entries: int                 # entries asked to be stored
    replicas_written: int        # (entry, node) puts that succeeded
    under_replicated: int        # entries stored on fewer nodes than the replication factor
    lost: int                    # entries no node took
    failed_nodes: tuple[str, ...]
    bytes_sent: int
    already_present: int = 0     # (entry, node) puts the node already held

    @property
    def entries_committed(self) -> int:
        """Entries stored somewhere (a CacheClient's PutResult has the same name)."""
        return self.entries - self.lost


class ClusterClient:
    """Blocking client for a cluster. Thread-safe."""

    def __init__(self, seeds: Sequence[str] = (), redis_url: str = "", *, options: ClientOptions | None = None,
                 replication: int = 2, namespace: str = DEFAULT_NAMESPACE, membership_ttl_s: float = 0.5,
                 suspect_s: float = 5.0, fetch_threads: int = 8) -> None:
        if not seeds and not redis_url:
            raise ValueError("a cluster client needs seed nodes or the cluster's Redis URL")
        if replication < 1:
            raise ValueError(f"replication must be >= 1, got {replication}")
        self.options = options or CLUSTER_OPTIONS
        self.replication = replication
        self.namespace = namespace
        self._index = ClusterIndex(connect(redis_url), namespace, membership_ttl_s) if redis_url else None
        self._seeds = list(seeds)
        self._membership_ttl_s = membership_ttl_s
        self._suspect_s = suspect_s
        self._lock = threading.Lock()
        self._clients: dict[str, CacheClient] = {}          # by gRPC address
        self._nodes: dict[str, NodeInfo] = {}
        self._nodes_at = 0.0
        self._suspect: dict[str, float] = {}                # node id -> monotonic time it is trusted again
        self._host = host_id()
        self._pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="cluster")
        self._chunk_size: int | None = None
        self._turn = itertools.count()

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
        if self._index is not None:
            self._index.client.close()

    def __enter__(self) -> "ClusterClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, nodes: int = 1, timeout_s: float = 30.0) -> dict[str, NodeInfo]:
        """Wait until at least ``nodes`` members are live; the members."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                live = self.nodes(fresh=True)
                if len(live) >= nodes:
                    return live
            except CacheServiceError:
                live = {}
            if time.monotonic() > deadline:
                raise UnavailableError(f"{len(live)} of {nodes} cluster nodes live after {timeout_s} s")
            time.sleep(0.1)

    # ------------------------------------------------------------ membership

    def nodes(self, fresh: bool = False) -> dict[str, NodeInfo]:
        """Live members by node id (cached for ``membership_ttl_s``)."""
        with self._lock:
            if not fresh and self._nodes and time.monotonic() - self._nodes_at < self._membership_ttl_s:
                return self._nodes
        nodes = self._members_from_redis() if self._index is not None else self._members_from_nodes()
        with self._lock:
            self._nodes, self._nodes_at = nodes, time.monotonic()
        return nodes

    def _members_from_redis(self) -> dict[str, NodeInfo]:
        try:
            members = self._index.members(fresh=True)
        except Exception as exc:   # noqa: BLE001 - redis-py raises its own hierarchy
            raise UnavailableError(f"cluster Redis unavailable: {type(exc).__name__}: {exc}") from None
        return {m.node_id: NodeInfo(m.node_id, m.grpc_address, m.host_id, m.transports) for m in members.values()}

    def _members_from_nodes(self) -> dict[str, NodeInfo]:
        """Ask known members, then the seeds, until one that reaches Redis answers."""
        with self._lock:
            addresses = list(dict.fromkeys([n.grpc_address for n in self._nodes.values()] + self._seeds))
        errors = []
        for address in addresses:
            try:
                nodes, redis_up = self._client_at(address).cluster_nodes()
            except CacheServiceError as exc:
                errors.append(f"{address}: {exc}")
                continue
            if redis_up:
                return nodes
            errors.append(f"{address}: has lost the cluster's Redis")
        raise UnavailableError("no cluster node answers for the membership: " + "; ".join(errors))

    def _client_at(self, address: str) -> CacheClient:
        with self._lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = CacheClient(address, self.options)
            return client

    def node(self, node_id: str) -> CacheClient:
        """The client of one live member."""
        info = self.nodes().get(node_id) or self.nodes(fresh=True).get(node_id)
        if info is None:
            raise UnavailableError(f"node {node_id} is not a live member of the cluster")
        return self._client_at(info.grpc_address)

    def _mark_suspect(self, node_id: str) -> None:
        with self._lock:
            self._suspect[node_id] = time.monotonic() + self._suspect_s

    def _ranking(self) -> Callable[[Sequence[str], bytes], list[str]]:
        """How to order a chunk's owners for trying them, from one look at the
        membership: live before dead, trusted before suspect, on this host before
        elsewhere, then by rendezvous weight of the chunk's key (so clients spread their
        reads over the replicas)."""
        live = self.nodes()
        now = time.monotonic()
        with self._lock:
            suspect = {n for n, until in self._suspect.items() if until > now}
        rank = {n: (n in suspect, live[n].host_id != self._host) for n in live}

        def ranked(owners: Sequence[str], key: bytes) -> list[str]:
            order = rendezvous(key, owners, len(owners))
            return sorted(order, key=lambda n: (n not in rank, *rank.get(n, (True, True))))
        return ranked

    def _any(self, call: Callable[[CacheClient], T]) -> T:
        """``call`` on live nodes in turn until one answers (NotFound is an answer),
        starting one further along each call (the nodes share the load), trusted first."""
        errors = []
        live = sorted(self.nodes())
        start = next(self._turn) % max(1, len(live))
        now = time.monotonic()
        for node_id in sorted(live[start:] + live[:start], key=lambda n: self._suspect.get(n, 0) > now):
            try:
                return call(self.node(node_id))
            except (UnavailableError, CacheServiceError) as exc:
                if isinstance(exc, NotFoundError):
                    raise
                self._mark_suspect(node_id)
                errors.append(f"{node_id}: {exc}")
        raise UnavailableError("no cluster node answered: " + ("; ".join(errors) or "no live members"))

    def _every(self, call: Callable[[CacheClient], T]) -> list[T]:
        """``call`` on every live node; the answers. Raises if none answered."""
        out, errors = [], []
        for node_id in self.nodes(fresh=True):
            try:
                out.append(call(self.node(node_id)))
            except CacheServiceError as exc:
                errors.append((node_id, exc))
        if not out:
            raise errors[0][1] if errors else UnavailableError("the cluster has no live members")
        return out

    # ------------------------------------------------------------ models and profiles (cluster-wide)

    def register_model(self, model_id: ModelId, weights_digest: str, family: FamilySpec,
                       replace: bool = False, tenant: str = "") -> Registered:
        """On every live node (a node that joins later adopts it from Redis)."""
        results = self._every(lambda c: c.register_model(model_id, weights_digest, family, replace, tenant))
        return dataclasses.replace(results[0], created=any(r.created for r in results))

    def family(self, family_id: FamilyId, tenant: str = "") -> FamilySpec:
        return self._any(lambda c: c.family(family_id, tenant))

    def list_models(self, tenant: str = "") -> list[dict]:
        return self._any(lambda c: c.list_models(tenant))

    def chunk_size(self) -> int:
        if self._chunk_size is None:
            self._chunk_size = self._any(lambda c: c.chunk_size())
        return self._chunk_size

    def hash_tokens(self, tokens: Sequence[int], family_id: FamilyId, *, tenant: str = "",
                    extra_keys: Sequence[str | bytes] = (), include_partial: bool = False) -> list[ChunkHash]:
        return chunk_hashes(tokens, FamilyId(family_id), tenant=tenant or self.options.tenant,
                            chunk_size=self.chunk_size(), extra_keys=extra_keys, include_partial=include_partial)

    def put_profile(self, producer: ModelId, consumer: ModelId, producer_digest: str, consumer_digest: str,
                    document: dict, tenant: str = "") -> int:
        return max(self._every(lambda c: c.put_profile(producer, consumer, producer_digest, consumer_digest,
                                                       document, tenant)))

    def get_profile(self, producer: ModelId, consumer: ModelId, tenant: str = "") -> StoredProfile:
        return self._any(lambda c: c.get_profile(producer, consumer, tenant))

    def list_profiles(self, producer: ModelId = NO_MODEL, consumer: ModelId = NO_MODEL,
                      tenant: str = "") -> list[StoredProfile]:
        return self._any(lambda c: c.list_profiles(producer, consumer, tenant))

    def flag_profile(self, producer: ModelId, consumer: ModelId, reason: str, version: int = 0,
                     tenant: str = "") -> bool:
        return any(self._every(lambda c: c.flag_profile(producer, consumer, reason, version, tenant)))

    # ------------------------------------------------------------ put

    def placement(self, chunk_hash: bytes) -> list[str]:
        """The nodes a chunk is put on: the ``replication`` highest rendezvous weights
        among live members."""
        return rendezvous(bytes(chunk_hash), self.nodes(), self.replication)

    def put(self, family_id: FamilyId, producer: ModelId, entries: Sequence[EntryData], tenant: str = "",
            transport: str | None = None) -> ClusterPutResult:
        """Each entry to every node its placement names, through each node's two-phase put
        (per node, all-or-nothing per batch), the nodes in parallel. A node that fails
        leaves its entries under-replicated (counted); an entry no node took is lost, and
        if every entry is lost the last error is raised."""
        groups: dict[str, list[EntryData]] = {}
        for entry in entries:
            for node_id in self.placement(entry.chunk_hash):
                groups.setdefault(node_id, []).append(entry)
        futures = {node_id: self._pool.submit(self._put_on, node_id, family_id, producer, group, tenant, transport)
                   for node_id, group in groups.items()}
        stored: dict[bytes, int] = {bytes(e.chunk_hash): 0 for e in entries}
        failed, sent, present, last_error = [], 0, 0, None
        for node_id, future in futures.items():
            try:
                result = future.result()
            except CacheServiceError as exc:
                failed.append(node_id)
                last_error = exc
                self._mark_suspect(node_id)
                continue
            sent += result.bytes_sent
            present += result.already_present
            for entry in groups[node_id]:
                stored[bytes(entry.chunk_hash)] += 1
        lost = sum(1 for n in stored.values() if n == 0)
        if entries and lost == len(stored) and last_error is not None:
            raise last_error
        return ClusterPutResult(len(entries), sum(stored.values()),
                                sum(1 for n in stored.values() if n < self.replication), lost,
                                tuple(sorted(failed)), sent, present)

    def _put_on(self, node_id: str, family_id: FamilyId, producer: ModelId, entries: list[EntryData], tenant: str,
                transport: str | None) -> PutResult:
        return self.node(node_id).put(family_id, producer, entries, tenant, transport)

    # ------------------------------------------------------------ lookup

    def lookup(self, family_id: FamilyId, hashes: Sequence[bytes], *, consumer: ModelId = NO_MODEL,
               producers: Sequence[str] = (), tenant: str = "", offer_tails: bool = False,
               **_one_node_only: Any) -> LookupResult:
        """Per producer, its longest run of leading ``hashes`` on live nodes, each chunk
        with its owners (``Hit.owners``; ``LookupResult.nodes`` says where they are), and
        with ``offer_tails`` the partial chunks stored after it (``Hit.tails``, to verify:
        :meth:`lookup_prompt` does). Straight from Redis when the client has its URL and
        no token, else through a node. A one-node lookup's leases and locate are ignored: a cluster holds
        no leases."""
        tenant = tenant or self.options.tenant
        if self._index is None or self.options.token:
            # With a token the nodes answer: they check it and bind the lookup to its
            # tenant (reading Redis directly is for trusted clients without tokens).
            return self._any(lambda c: c.cluster_lookup(family_id, hashes, consumer=consumer, producers=producers,
                                                        tenant=tenant, offer_tails=offer_tails))
        root = parent_of(hashes, 0, tenant, FamilyId(family_id), self.chunk_size()) if offer_tails else None
        try:
            found = self._index.lookup(tenant, family_id, hashes, producers, root)
        except Exception as exc:   # noqa: BLE001 - redis-py's errors
            raise UnavailableError(f"cluster index unavailable: {type(exc).__name__}: {exc}") from None
        nodes = self.nodes()
        hits = [Hit(h.producer, bool(consumer) and h.producer == consumer, h.entry_ids, h.position_offsets,
                    h.layouts, h.tiers, "", tuple(TailOffer(r.chunk_hash, r.entry_id, r.position_offset, r.layout,
                                                            r.tier, None, owners) for r, owners in h.tails),
                    owners=tuple(h.owners)) for h in found]
        used = {n for h in hits for owners in (*h.owners, *(t.owners for t in h.tails)) for n in owners}
        return LookupResult(hits, "", {n: nodes[n] for n in used if n in nodes})

    def lookup_prompt(self, family_id: FamilyId, tokens: Sequence[int], *, consumer: ModelId = NO_MODEL,
                      producers: Sequence[str] = (), tenant: str = "", extra_keys: Sequence[str | bytes] = (),
                      hashes: Sequence[bytes] | None = None, **_one_node_only: Any) -> LookupResult:
        """The hits for a prompt's tokens across the cluster, reaching where a stored
        context ends even mid-chunk (its partial chunk offered and verified here), as
        :meth:`CacheClient.lookup_prompt` does on one node."""
        tenant = tenant or self.options.tenant
        if hashes is None:
            hashes = self.hash_tokens(tokens, family_id, tenant=tenant, extra_keys=extra_keys, include_partial=True)
        result = self.lookup(family_id, hashes, consumer=consumer, producers=producers, tenant=tenant,
                             offer_tails=True)
        return verified(tokens, hashes, result, self.chunk_size(), tenant, family_id, extra_keys)

    # ------------------------------------------------------------ get

    def arena(self, hit: Hit | None = None, transport: str | None = None) -> None:
        """No direct memory-tier reads through a cluster client (the loaders fetch)."""
        return None

    def get(self, family_id: FamilyId, entries: Hit, kinds: Sequence[Kind] = (Kind.K, Kind.V),
            layers: tuple[int, int] | None = None, *, out: Mapping[Kind, Any] | None = None,
            as_torch: bool = False, tenant: str = "", transport: str | None = None) -> Slabs:
        stream = self.stream_selections(family_id, entries, [(kinds, layers or (0, 0))], outs=[out],
                                        as_torch=as_torch, tenant=tenant, transport=transport)
        for _ in stream:
            pass
        return stream.results()[0]

    def stream_selections(self, family_id: FamilyId, hit: Hit,
                          selections: Sequence[tuple[Sequence[Kind], tuple[int, int]]], *,
                          outs: Sequence[Mapping[Kind, Any] | None] | None = None, as_torch: bool = False,
                          tenant: str = "", transport: str | None = None) -> "ClusterSelectionStream":
        """As :meth:`CacheClient.stream_selections`, for a cluster hit: each chunk from
        one of its owners, falling over to the next on any failure. Layers are yielded as
        they complete when one node serves the whole hit; otherwise once every node's
        share has landed."""
        if len(hit.owners) != hit.num_chunks:
            raise ValueError("not a cluster hit: look it up with this ClusterClient")
        return ClusterSelectionStream(self, family_id, self.family(family_id, tenant), hit, selections, outs, as_torch,
                                      tenant or self.options.tenant, transport)

    # ------------------------------------------------------------ cross-context reuse (homed by key)
    #
    # A segment's sources live on the ``replication`` live nodes its key weighs highest
    # with (rendezvous, as chunks are placed); each node checks a source's chain against
    # the global index, so the chain's chunks may sit anywhere. An anchor pool is state
    # that changes with every use (activations, the byte budget), so it has one home: the
    # highest-weighted live node for the pool. When a home is gone its successor starts
    # without what it held: a miss (a dense prefill that records again), never a wrong
    # cache. A membership change moves homes, and what the old home held follows on the
    # first read that misses at the new one (read repair): the key's next home, which
    # was its first before a node joined or is a replica after one left, is asked, and
    # what it answers is put at the new home.

    def segment_key(self, tokens: Sequence[int], family_id: FamilyId, *, tenant: str = "",
                    extra_keys: Sequence[str | bytes] = ()) -> bytes:
        return segment_key(tokens, FamilyId(family_id), tenant=tenant or self.options.tenant, extra_keys=extra_keys)

    def _homes(self, key: bytes) -> list[str]:
        """Every live node, in ``key``'s rendezvous order (its homes first)."""
        live = self.nodes()
        return rendezvous(bytes(key), live, len(live))

    def _at_home(self, key: bytes, call: Callable[[CacheClient], T], replicas: int = 1,
                 exclude: frozenset[str] = frozenset()) -> list[T]:
        """``call`` on ``key``'s first ``replicas`` homes that answer (not ``exclude``);
        only an unreachable node is passed over (any other error is the answer)."""
        answers, errors = [], []
        for node_id in self._homes(key):
            if len(answers) == replicas:
                break
            if node_id in exclude:
                continue
            try:
                answers.append(call(self.node(node_id)))
            except (UnavailableError, DeadlineExceededError) as exc:
                self._mark_suspect(node_id)
                errors.append(f"{node_id}: {exc}")
        if not answers:
            raise UnavailableError("no home of the key answered: " + ("; ".join(errors) or "no live members"))
        return answers

    def put_segment(self, family_id: FamilyId, key: bytes, source: SegmentSource, tenant: str = "") -> int:
        """On the key's ``replication`` homes (past unreachable ones); how many sources the
        segment has on the first."""
        return self._at_home(key, lambda c: c.put_segment(family_id, key, source, tenant), self.replication)[0]

    def find_segments(self, family_id: FamilyId, keys: Sequence[bytes], max_sources: int = 0,
                      tenant: str = "") -> list[list[SegmentSource]]:
        """Each key's live sources from its first home that answers: one call per home
        for the keys it is first home of; a key whose first home is unreachable asks its
        next homes alone."""
        homes = [self._homes(key) for key in keys]
        by_home: dict[str, list[int]] = {}
        for i, mine in enumerate(homes):
            if mine:
                by_home.setdefault(mine[0], []).append(i)
        found: list[list[SegmentSource]] = [[] for _ in keys]
        for node_id, indices in by_home.items():
            group = [bytes(keys[i]) for i in indices]
            try:
                answer = self.node(node_id).find_segments(family_id, group, max_sources, tenant)
            except (UnavailableError, DeadlineExceededError):
                self._mark_suspect(node_id)
                answer = [self._at_home(k, lambda c, k=k: c.find_segments(family_id, [k], max_sources, tenant)[0],
                                        exclude=frozenset({node_id}))[0] for k in group]
            for i, sources in zip(indices, answer, strict=True):
                found[i] = sources
        self._repair_segments(family_id, keys, homes, found, max_sources, tenant)
        return found

    def _repair_segments(self, family_id: FamilyId, keys: Sequence[bytes], homes: list[list[str]],
                         found: list[list[SegmentSource]], max_sources: int, tenant: str) -> None:
        """Keys ``found`` nothing for at their first home (of ``homes``, each key's in
        order): ask each one's second home (one call per such home), fill ``found`` from
        it and put what it had at the first home, best effort (a source the first home
        refuses, e.g. its chain is gone, stays out). One more call per missing batch, on
        misses only."""
        by_second: dict[str, list[int]] = {}
        for i, mine in enumerate(homes):
            if not found[i] and len(mine) > 1:
                by_second.setdefault(mine[1], []).append(i)
        for node_id, indices in by_second.items():
            try:
                answer = self.node(node_id).find_segments(family_id, [bytes(keys[i]) for i in indices],
                                                          max_sources, tenant)
            except (UnavailableError, DeadlineExceededError):
                self._mark_suspect(node_id)
                continue
            for i, sources in zip(indices, answer, strict=True):
                found[i] = sources
                for source in sources:
                    with contextlib.suppress(CacheServiceError):
                        self.node(homes[i][0]).put_segment(family_id, bytes(keys[i]), source, tenant)

    def _anchor_home_key(self, family_id: FamilyId, placeholder: str, tenant: str) -> bytes:
        tenant = tenant or self.options.tenant
        return hashlib.blake2b(f"{tenant}\0{family_id}\0{placeholder}".encode(), digest_size=16).digest()

    def admit_anchor(self, family_id: FamilyId, placeholder: str, key: bytes, base: SegmentSource,
                     tenant: str = "") -> tuple[bool, list[bytes]]:
        return self._at_home(self._anchor_home_key(family_id, placeholder, tenant),
                             lambda c: c.admit_anchor(family_id, placeholder, key, base, tenant))[0]

    def record_anchor(self, family_id: FamilyId, placeholder: str, key: bytes, delta: AnchorDelta,
                      tenant: str = "") -> list[bytes]:
        return self._at_home(self._anchor_home_key(family_id, placeholder, tenant),
                             lambda c: c.record_anchor(family_id, placeholder, key, delta, tenant))[0]

    def find_anchors(self, family_id: FamilyId, placeholder: str, min_length: int = 0,
                     tenant: str = "") -> list[AnchorInfo]:
        """The pool's anchors at its home. A home whose pool is empty may be new (a
        membership change): then the pool's next home is asked, and what it holds is
        admitted and recorded at the home, its activation counts starting over (best
        effort: the home's own admission rules and budget apply)."""
        home_key = self._anchor_home_key(family_id, placeholder, tenant)
        anchors = self._at_home(home_key, lambda c: c.find_anchors(family_id, placeholder, min_length, tenant))[0]
        homes = self._homes(home_key)
        if anchors or len(homes) < 2:
            return anchors
        try:
            anchors = self.node(homes[1]).find_anchors(family_id, placeholder, min_length, tenant)
        except (UnavailableError, DeadlineExceededError):
            self._mark_suspect(homes[1])
            return []
        home = self.node(homes[0])
        for anchor in anchors:
            with contextlib.suppress(CacheServiceError):
                home.admit_anchor(family_id, placeholder, anchor.segment_key, anchor.base, tenant)
                for delta in anchor.deltas.values():
                    home.record_anchor(family_id, placeholder, anchor.segment_key, delta, tenant)
        return anchors

    def activate_anchors(self, family_id: FamilyId, placeholder: str, keys: Sequence[bytes],
                         tenant: str = "") -> int:
        return self._at_home(self._anchor_home_key(family_id, placeholder, tenant),
                             lambda c: c.activate_anchors(family_id, placeholder, keys, tenant))[0]

    # ------------------------------------------------------------ housekeeping

    def delete(self, family_id: FamilyId, *, entry_ids: Sequence[bytes] = (), chunk_hashes: Sequence[bytes] = (),
               producer: str = "", tenant: str = "") -> int:
        """On every live node; entries deleted, replicas counted once each."""
        return sum(self._every(lambda c: c.delete(family_id, entry_ids=entry_ids, chunk_hashes=chunk_hashes,
                                                  producer=producer, tenant=tenant)))

    def unpin(self, lease_id: str) -> None:
        """Cluster lookups hold no leases: only the empty lease id is accepted."""
        if lease_id:
            raise ValueError("a cluster client holds no leases; unpin on the node that issued it")

    def stats(self) -> dict[str, dict]:
        """Every live node's stats, by node id (a node that does not answer is left out)."""
        out = {}
        for node_id in self.nodes(fresh=True):
            try:
                out[node_id] = self.node(node_id).stats()
            except CacheServiceError:
                self._mark_suspect(node_id)
        return out


class ClusterSelectionStream:
    """A cluster fetch in progress; iterate for (selection, layer), then ``results()``.

    Each chunk is assigned to an owner (ranked by :meth:`ClusterClient._ranking`, keeping
    runs of chunks on one node where a replica allows). Rounds: every node's share is
    fetched in parallel into arrays of its own and the chunks that arrived whole and
    verified are copied into place; the rest go to their next owner. When one node holds
    the whole hit its fetch lands in place directly and layers stream as they complete;
    a layer with a miss is held back until the retry has filled it."""

    def __init__(self, cluster: ClusterClient, family_id: FamilyId, family: FamilySpec, hit: Hit,
                 selections: Sequence[tuple[Sequence[Kind], tuple[int, int]]],
                 outs: Sequence[Mapping[Kind, Any] | None] | None, as_torch: bool, tenant: str,
                 transport: str | None) -> None:
        self._cluster, self._family_id, self._hit = cluster, family_id, hit
        self._selections = [(list(kinds), start, end or family.num_layers) for kinds, (start, end) in selections]
        self._tenant, self._transport, self._as_torch = tenant, transport, as_torch
        outs = list(outs) if outs is not None else [None] * len(selections)
        tokens = [lay.num_tokens for lay in hit.layouts]
        self._final = [SlabAssembler(family, tokens, kinds, start, end, out, as_torch)
                       for (kinds, start, end), out in zip(self._selections, outs, strict=True)]
        ranked = cluster._ranking()
        self._candidates = [ranked(owners, bytes(entry)) for owners, entry in zip(hit.owners, hit.entry_ids, strict=True)]
        self._valid = [False] * hit.num_chunks
        self._reasons: dict[int, str] = {}
        self._bytes = 0
        self.transport = ""

    def arrays(self, selection: int) -> dict[Kind, Any]:
        return self._final[selection].arrays

    def _assign(self) -> dict[str, list[int]]:
        """Next owner of every chunk still to fetch, staying on the previous chunk's node
        where it is also an owner."""
        groups: dict[str, list[int]] = {}
        previous = None
        for i, valid in enumerate(self._valid):
            if valid or not self._candidates[i]:
                continue
            node = previous if previous in self._candidates[i] else self._candidates[i][0]
            groups.setdefault(node, []).append(i)
            previous = node
        return groups

    def __iter__(self) -> Iterator[tuple[int, int]]:
        yielded: set[tuple[int, int]] = set()
        groups = self._assign()
        if len(groups) == 1 and len(next(iter(groups.values()))) == self._hit.num_chunks:
            node_id = next(iter(groups))
            yield from self._direct(node_id, yielded)
        while any(not v and c for v, c in zip(self._valid, self._candidates, strict=True)):
            self._round(self._assign())
        for sel, (_kinds, start, end) in enumerate(self._selections):
            for layer in range(start, end):
                if (sel, layer) not in yielded:
                    yield sel, layer

    def _direct(self, node_id: str, yielded: set[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """The whole hit from one node, straight into the final arrays, layers streamed
        while they are clean."""
        entries = self._hit.entries
        try:
            stream = self._cluster.node(node_id).stream_selections(
                self._family_id, entries, [(kinds, (start, end)) for kinds, start, end in self._selections],
                outs=[part.arrays for part in self._final], as_torch=self._as_torch, tenant=self._tenant,
                transport=self._transport)
            for sel, layer in stream:
                if not any(m.layer_start <= layer < m.layer_start + m.num_layers for m in stream.missing(sel)):
                    yielded.add((sel, layer))
                    yield sel, layer
            results = stream.results()
        except CacheServiceError as exc:
            self._failed(node_id, range(len(entries)), str(exc))
            return
        self.transport = stream.transport
        self._settle(node_id, list(range(len(entries))), results)

    def _round(self, groups: dict[str, list[int]]) -> None:
        futures = {node_id: self._cluster._pool.submit(self._fetch_share, node_id, indices)
                   for node_id, indices in groups.items()}
        for node_id, future in futures.items():
            indices = groups[node_id]
            try:
                results = future.result()
            except CacheServiceError as exc:
                self._failed(node_id, indices, str(exc))
                continue
            self._settle(node_id, indices, results, copy=True)

    def _fetch_share(self, node_id: str, indices: list[int]) -> list[Slabs]:
        entries = [self._hit.entries[i] for i in indices]
        stream = self._cluster.node(node_id).stream_selections(
            self._family_id, entries, [(kinds, (start, end)) for kinds, start, end in self._selections],
            as_torch=self._as_torch, tenant=self._tenant, transport=self._transport)
        for _ in stream:
            pass
        self.transport = self.transport or stream.transport
        return stream.results()

    def _settle(self, node_id: str, indices: list[int], results: list[Slabs], copy: bool = False) -> None:
        """Mark the chunks that arrived whole (every selection) valid, copying them into
        place from a share's own arrays; the others move on to their next owner."""
        bad: dict[int, str] = {}
        for slabs in results:
            self._bytes += slabs.bytes_received
            for m in slabs.missing:
                bad.setdefault(m.entry_index, m.reason)
        for local, i in enumerate(indices):
            if local in bad:
                self._next_owner(node_id, i, bad[local])
                continue
            if copy:
                for part, slabs in zip(self._final, results, strict=True):
                    t0, t = part.offsets[i], part.tokens[i]
                    s0 = slabs.token_offsets[local]
                    for kind, array in part.arrays.items():
                        array[:, t0:t0 + t] = slabs.arrays[kind][:, s0:s0 + t]
            self._valid[i] = True

    def _failed(self, node_id: str, indices: Sequence[int], reason: str) -> None:
        self._cluster._mark_suspect(node_id)
        for i in indices:
            self._next_owner(node_id, i, f"{node_id}: {reason}")

    def _next_owner(self, node_id: str, i: int, reason: str) -> None:
        if node_id in self._candidates[i]:
            self._candidates[i].remove(node_id)
        self._reasons[i] = reason

    def results(self) -> list[Slabs]:
        """One :class:`Slabs` per selection; ``valid_chunks`` counts the leading chunks
        some owner delivered whole and verified."""
        valid = next((i for i, v in enumerate(self._valid) if not v), len(self._valid))
        out = []
        for part in self._final:
            missing = [Missing(i, kind, part.start, part.end - part.start, self._reasons.get(i, "no owner left"))
                       for i, v in enumerate(self._valid) if not v for kind in part.kinds]
            out.append(Slabs(part.arrays, part.start, part.end, part.offsets, valid, missing, self._bytes,
                             self.transport))
        return out

