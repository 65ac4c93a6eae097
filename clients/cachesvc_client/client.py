"""Synchronous client. Thread-safe: one channel (HTTP/2 connection) is shared by all
calls; make one client per process and reuse it."""

from __future__ import annotations

import json
import mmap
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc

from cachesvc.wire.keys import (NO_FAMILY, NO_MODEL, ChunkHash, FamilyId, FamilySpec, Kind, ModelId, chunk_hashes,
                                segment_key)
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.v1 import cachesvc_pb2_grpc as pb_grpc
from cachesvc.wire.convert import (anchor_from_proto, delta_to_proto, family_from_proto, family_to_proto,
                                   source_from_proto, source_to_proto)
from cachesvc.wire.segments import AnchorDelta, AnchorInfo, SegmentSource
from cachesvc_client.codec import (EntryData, Hit, HitEntry, LookupResult, PutResult, Registered,
                                   NodeInfo, SelectionAssembler, SlabAssembler, Slabs, StoredEntry, StoredProfile, bulk_methods,
                                   entries_from_proto, entry_columns, lookup_from_proto, plan_put, write_chunks)
from cachesvc_client.errors import CacheServiceError, NotFoundError, UnavailableError, from_rpc_error
from cachesvc_client.options import ClientOptions, batches
from cachesvc_client.prompt import verified
from cachesvc_client.transports import ShmTransport, Transport, choose_transport

__all__ = ["CacheClient"]


class TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                       grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``metadata`` (the API token) to every call of a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, tuple(details.metadata or ()) + self._metadata,
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class CacheClient:
    """Blocking client for one cachesvc node.

    Idempotent calls (lookup, get, stats, list, register, delete) are retried on
    UNAVAILABLE by gRPC's retry policy (:class:`ClientOptions`); the put sequence is not,
    but a failed put is aborted, so nothing of it stays reserved or becomes visible.
    Errors are :class:`~cachesvc_client.errors.CacheServiceError` subclasses.
    """

    def __init__(self, target: str, options: ClientOptions | None = None) -> None:
        self.target = target
        self.options = options or ClientOptions()
        credentials = self.options.credentials()
        channel = grpc.insecure_channel(target, options=self.options.channel_options()) if credentials is None \
            else grpc.secure_channel(target, credentials, options=self.options.channel_options())
        self._raw_channel = channel
        self._channel = grpc.intercept_channel(channel, TokenInterceptor(self.options.metadata())) \
            if self.options.token else channel
        self._stub = pb_grpc.CacheServiceStub(self._channel)
        self._get_slabs, self._write_slabs = bulk_methods(self._channel)
        self._families: dict[str, FamilySpec] = {}
        self._chunk_size: int | None = None
        self._transports: dict[str, Transport | None] = {}
        self._transports_lock = threading.Lock()

    # -- lifecycle

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        try:
            grpc.channel_ready_future(self._raw_channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise CacheServiceError(f"{self.target} not reachable within {timeout_s} s") from None

    def close(self) -> None:
        for transport in self._transports.values():
            if transport is not None:
                transport.close()
        self._channel.close()

    def __enter__(self) -> "CacheClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout_s or self.options.timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # -- models

    def register_model(self, model_id: ModelId, weights_digest: str, family: FamilySpec,
                       replace: bool = False, tenant: str = "") -> Registered:
        """Register the tenant's model (models are per tenant, like entries); with
        ``replace``, other weights under the same id replace it and drop its entries."""
        model = pb.ModelSpec(model_id=model_id, weights_digest=weights_digest,
                             family=family_to_proto(family))
        resp = self._call(self._stub.RegisterModel, pb.RegisterModelRequest(
            model=model, replace=replace, tenant=tenant or self.options.tenant))
        self._families[resp.family_id] = family
        self._chunk_size = resp.chunk_size
        return Registered(FamilyId(resp.family_id), resp.chunk_size, resp.created)

    def family(self, family_id: FamilyId, tenant: str = "") -> FamilySpec:
        """The family spec (cached; fetched from the tenant's model list if unknown: models
        are per tenant, so a client that did not register the model itself must ask the
        tenant it calls for)."""
        if family_id not in self._families:
            req = pb.ListModelsRequest(tenant=tenant or self.options.tenant)
            for m in self._call(self._stub.ListModels, req).models:
                self._families[m.family_id] = family_from_proto(m.model.family)
        if family_id not in self._families:
            raise NotFoundError(f"family {family_id} has no registered model on {self.target}")
        return self._families[family_id]

    def list_models(self, tenant: str = "") -> list[dict]:
        resp = self._call(self._stub.ListModels, pb.ListModelsRequest(tenant=tenant or self.options.tenant))
        return [{"model_id": m.model.model_id, "weights_digest": m.model.weights_digest,
                 "family_id": m.family_id} for m in resp.models]

    # ------------------------------------------------------------ reuse profiles

    def put_profile(self, producer: ModelId, consumer: ModelId, producer_digest: str, consumer_digest: str,
                    document: dict, tenant: str = "") -> int:
        """Store the pair's profile (measured on these weights); its version."""
        spec = pb.ProfileSpec(producer=producer, consumer=consumer, producer_digest=producer_digest,
                              consumer_digest=consumer_digest,
                              document=json.dumps(document, separators=(",", ":")).encode())
        return self._call(self._stub.PutProfile, pb.PutProfileRequest(
            profile=spec, tenant=tenant or self.options.tenant)).version

    def get_profile(self, producer: ModelId, consumer: ModelId, tenant: str = "") -> StoredProfile:
        """The pair's current profile. NotFoundError if there is none,
        FailedPreconditionError if it is stale (a model changed since)."""
        resp = self._call(self._stub.GetProfile, pb.GetProfileRequest(
            producer=producer, consumer=consumer, tenant=tenant or self.options.tenant))
        m = resp.profile
        return StoredProfile(m.producer, m.consumer, m.producer_digest, m.consumer_digest, resp.version,
                             json.loads(m.document), False, len(m.document), resp.flagged)

    def list_profiles(self, producer: ModelId = NO_MODEL, consumer: ModelId = NO_MODEL,
                      tenant: str = "") -> list[StoredProfile]:
        resp = self._call(self._stub.ListProfiles, pb.ListProfilesRequest(
            producer=producer, consumer=consumer, tenant=tenant or self.options.tenant))
        return [StoredProfile(p.producer, p.consumer, p.producer_digest, p.consumer_digest, p.version,
                              None, p.stale, p.size_bytes, p.flagged, p.flags) for p in resp.profiles]

    def flag_profile(self, producer: ModelId, consumer: ModelId, reason: str, version: int = 0,
                     tenant: str = "") -> bool:
        """Ask for the pair to be re-profiled (what was seen, in ``reason``). With
        ``version``, only if that version is still the current one; True if applied."""
        request = pb.FlagProfileRequest(producer=producer, consumer=consumer, version=version, reason=reason,
                                        tenant=tenant or self.options.tenant)
        return self._call(self._stub.FlagProfile, request).applied

    # ------------------------------------------------------------ cross-context reuse

    def segment_key(self, tokens: Sequence[int], family_id: FamilyId, *, tenant: str = "",
                    extra_keys: Sequence[str | bytes] = ()) -> bytes:
        """The content key of a segment (wire.keys.segment_key) in this client's tenant."""
        return segment_key(tokens, FamilyId(family_id), tenant=tenant or self.options.tenant, extra_keys=extra_keys)

    def put_segment(self, family_id: FamilyId, key: bytes, source: SegmentSource, tenant: str = "") -> int:
        """Register a span of a stored chain as a source of segment ``key`` (no copy);
        how many sources the segment has. FailedPrecondition if the chain is not stored."""
        req = pb.PutSegmentRequest(tenant=tenant or self.options.tenant, family_id=family_id, segment_key=key,
                                   source=source_to_proto(source))
        return self._call(self._stub.PutSegment, req).sources

    def find_segments(self, family_id: FamilyId, keys: Sequence[bytes], max_sources: int = 0,
                      tenant: str = "") -> list[list[SegmentSource]]:
        """Each key's live sources, newest first (empty where none)."""
        req = pb.FindSegmentsRequest(tenant=tenant or self.options.tenant, family_id=family_id,
                                     segment_keys=list(keys), max_sources=max_sources)
        return [[source_from_proto(s) for s in seg.sources]
                for seg in self._call(self._stub.FindSegments, req).segments]

    def admit_anchor(self, family_id: FamilyId, placeholder: str, key: bytes, base: SegmentSource,
                     tenant: str = "") -> tuple[bool, list[bytes]]:
        """Make content ``key`` (base K/V at ``base``) an anchor of the placeholder's pool:
        (admitted, segment keys evicted for it)."""
        anchor = pb.AnchorInfo(segment_key=key, length=base.length, base=source_to_proto(base))
        resp = self._call(self._stub.AdmitAnchor, pb.AdmitAnchorRequest(
            tenant=tenant or self.options.tenant, family_id=family_id, placeholder=placeholder, anchor=anchor))
        return resp.admitted, [bytes(k) for k in resp.evicted]

    def record_anchor(self, family_id: FamilyId, placeholder: str, key: bytes, delta: AnchorDelta,
                      tenant: str = "") -> list[bytes]:
        """Record an agent's offsets for anchor ``key`` (their entries put first); the
        anchors evicted to stay in the pool's byte budget."""
        resp = self._call(self._stub.RecordAnchor, pb.RecordAnchorRequest(
            tenant=tenant or self.options.tenant, family_id=family_id, placeholder=placeholder, segment_key=key,
            delta=delta_to_proto(delta)))
        return [bytes(k) for k in resp.evicted]

    def find_anchors(self, family_id: FamilyId, placeholder: str, min_length: int = 0,
                     tenant: str = "") -> list[AnchorInfo]:
        """The placeholder's live anchors at least ``min_length`` tokens long, oldest first."""
        resp = self._call(self._stub.FindAnchors, pb.FindAnchorsRequest(
            tenant=tenant or self.options.tenant, family_id=family_id, placeholder=placeholder,
            min_length=min_length))
        return [anchor_from_proto(a) for a in resp.anchors]

    def activate_anchors(self, family_id: FamilyId, placeholder: str, keys: Sequence[bytes],
                         tenant: str = "") -> int:
        """Count one use of each anchor an estimate leaned on (eviction keeps the used ones)."""
        return self._call(self._stub.ActivateAnchors, pb.ActivateAnchorsRequest(
            tenant=tenant or self.options.tenant, family_id=family_id, placeholder=placeholder,
            segment_keys=list(keys))).activated

    def chunk_size(self) -> int:
        if self._chunk_size is None:
            self._chunk_size = self.stats()["chunk_size"]
        return self._chunk_size

    def hash_tokens(self, tokens: Sequence[int], family_id: FamilyId, *, tenant: str = "",
                    extra_keys: Sequence[str | bytes] = (),
                    include_partial: bool = False) -> list[ChunkHash]:
        """Chunk hashes of a prompt's full chunks (and, with ``include_partial``, of a
        trailing partial chunk), with this server's chunk size."""
        return chunk_hashes(tokens, FamilyId(family_id), tenant=tenant or self.options.tenant,
                            chunk_size=self.chunk_size(), extra_keys=extra_keys,
                            include_partial=include_partial)

    # -- put

    def put(self, family_id: FamilyId, producer: ModelId, entries: Sequence[EntryData],
            tenant: str = "", transport: str | None = None) -> PutResult:
        """Store entries. Each batch of about ``options.max_put_bytes`` is atomic: all its
        entries become visible at once or none does. The bytes go over ``transport``
        (default ``options.transport``); Reserve and Commit over gRPC, or, where that is
        the node's shm (this host), over its Unix socket with the bytes: a put is then no
        gRPC call at all (0.66 and 0.62 ms per call saved here)."""
        family = self.family(family_id, tenant)
        chosen = self._transport(transport or self.options.transport)
        local = chosen if isinstance(chosen, ShmTransport) else None
        committed = present = sent = 0
        for batch in batches(entries, self.options.max_put_bytes):
            plan = plan_put(tenant or self.options.tenant, family_id, family, producer, batch)
            res, committer = self._reserve(plan.request, local)
            try:
                todo = [t for t in res.targets if not t.already_present]
                if todo and chosen is not None:
                    chosen.write(res.reservation_id, plan, todo)
                elif todo:
                    self._call(self._write_slabs, write_chunks(res.reservation_id, plan, todo),
                               self.options.data_timeout_s)
                commit = pb.CommitRequest(reservation_id=res.reservation_id)
                # Over the socket with no fallback: where it fails mid-commit the commit may
                # have happened, and a second one would answer NotFound for a stored batch.
                committed += (committer.commit(commit) if committer is not None
                              else self._call(self._stub.Commit, commit)).entries_committed
            except BaseException:
                self._abort_quietly(res.reservation_id)
                raise
            present += sum(t.already_present for t in res.targets)
            sent += sum(t.size_bytes for t in todo)
        return PutResult(committed, present, sent)

    def _reserve(self, request: pb.ReserveRequest,
                 local: ShmTransport | None) -> tuple[pb.ReserveResponse, ShmTransport | None]:
        """The reservation, and the socket to commit it over (None: gRPC). Where the
        socket fails (or a node without RESERVE closes it), gRPC reserves, and commits
        (a reservation the socket may have made expires unused)."""
        res, by_socket = self._socket_or_grpc(local, local and local.reserve, self._stub.Reserve, request)
        return res, local if by_socket else None

    def _socket_or_grpc(self, local: ShmTransport | None, ask, rpc, request) -> tuple:
        """``ask(request)`` over the node's Unix socket where ``local``, else (or where the
        socket fails) ``rpc`` over gRPC, which retries as it does; (the answer, whether the
        socket gave it)."""
        if local is not None:
            try:
                return ask(request), True
            except UnavailableError:
                pass
        return self._call(rpc, request), False

    def _abort_quietly(self, reservation_id: str) -> None:
        try:
            self._stub.Abort(pb.AbortRequest(reservation_id=reservation_id),
                             timeout=self.options.timeout_s)
        except grpc.RpcError:
            pass   # already closed, or the server is gone; expiry reclaims it

    # -- lookup and get

    def lookup(self, family_id: FamilyId, hashes: Sequence[bytes], *, consumer: ModelId = NO_MODEL,
               producers: Sequence[str] = (), lease_ttl_s: int = 0, tenant: str = "",
               tail_hashes: Sequence[bytes] = (), offer_tails: bool = False, locate: bool = False) -> LookupResult:
        """Per producer, its entries for the longest run of leading ``hashes``, and for the
        first of ``tail_hashes`` (partial chunks continuing the chain) it holds after them;
        with ``offer_tails``, ``Hit.tails`` lists the partial chunks stored after each run
        (see :meth:`lookup_prompt`, which verifies them). With ``locate``, ``Hit.locations``
        says where the entries lie in the node's memory tier (see :meth:`arena`)."""
        req = pb.LookupRequest(tenant=tenant or self.options.tenant, family_id=family_id,
                               chunk_hashes=hashes, consumer=consumer, producers=producers,
                               lease_ttl_s=lease_ttl_s, tail_hashes=tail_hashes, offer_tails=offer_tails,
                               locate=locate)
        local = self._local()
        return lookup_from_proto(self._socket_or_grpc(local, local and local.lookup, self._stub.Lookup, req)[0])

    def _local(self) -> ShmTransport | None:
        """The node's Unix socket where this client is on the node's host: lookups and
        unpins go there, a socket round trip instead of gRPC's (0.13-0.22 against
        0.6-0.9 ms on these hosts)."""
        local = self._transport(self.options.transport)
        return local if isinstance(local, ShmTransport) else None

    def cluster_lookup(self, family_id: FamilyId, hashes: Sequence[bytes], *, consumer: ModelId = NO_MODEL,
                       producers: Sequence[str] = (), tenant: str = "", offer_tails: bool = False) -> LookupResult:
        """The longest runs across the node's whole cluster (``Hit.owners``,
        ``LookupResult.nodes``); FailedPrecondition from a lone node. Use a
        :class:`~cachesvc_client.cluster.ClusterClient` to fetch them."""
        req = pb.LookupRequest(tenant=tenant or self.options.tenant, family_id=family_id, chunk_hashes=hashes,
                               consumer=consumer, producers=producers, cluster=True, offer_tails=offer_tails)
        return lookup_from_proto(self._call(self._stub.Lookup, req))

    def cluster_nodes(self) -> tuple[dict[str, NodeInfo], bool]:
        """The cluster's live members as this node sees them, and whether it reaches Redis."""
        resp = self._call(self._stub.ListNodes, pb.ListNodesRequest())
        return ({d.node_id: NodeInfo.from_proto(d) for d in resp.nodes},
                resp.redis_up)

    def lookup_prompt(self, family_id: FamilyId, tokens: Sequence[int], *, consumer: ModelId = NO_MODEL,
                      producers: Sequence[str] = (), lease_ttl_s: int = 0, tenant: str = "",
                      extra_keys: Sequence[str | bytes] = (), locate: bool = False,
                      hashes: Sequence[bytes] | None = None) -> LookupResult:
        """The hits for a prompt's tokens, reaching where a stored context ends even
        mid-chunk, in one round trip: the chain of the prompt's chunks (its own trailing
        partial chunk included), and, where a producer's run stops before the prompt's end,
        the longest partial chunk it stored there (put with its parent, as the connectors'
        producers do) that the prompt's next tokens hash to (docs/chunk-keys.md). With a
        lease, offers that did not verify stay pinned until it ends. ``hashes``: that chain
        (``hash_tokens(..., include_partial=True)``), when the caller has it already."""
        tenant = tenant or self.options.tenant
        if hashes is None:
            hashes = self.hash_tokens(tokens, family_id, tenant=tenant, extra_keys=extra_keys, include_partial=True)
        result = self.lookup(family_id, hashes, consumer=consumer, producers=producers, lease_ttl_s=lease_ttl_s,
                             tenant=tenant, offer_tails=True, locate=locate)
        return verified(tokens, hashes, result, self.chunk_size(), tenant, family_id, extra_keys)

    def get(self, family_id: FamilyId, entries: Hit | Sequence[HitEntry], kinds: Sequence[Kind] = (Kind.K, Kind.V),
            layers: tuple[int, int] | None = None, *, out: Mapping[Kind, Any] | None = None,
            as_torch: bool = False, tenant: str = "", transport: str | None = None) -> Slabs:
        """Fetch ``kinds`` over ``layers`` = [start, end) of ``entries`` (a lookup hit, or
        some of its entries) into ``out`` or fresh arrays ``[layers, tokens, ...]``; see
        :class:`Slabs`. ``transport`` overrides ``options.transport``."""
        stream = self.stream(family_id, entries, kinds, layers, out=out, as_torch=as_torch,
                             tenant=tenant, transport=transport, layer_major=False)
        for _ in stream:
            pass
        return stream.result()

    def stream(self, family_id: FamilyId, entries: Hit | Sequence[HitEntry],
               kinds: Sequence[Kind] = (Kind.K, Kind.V), layers: tuple[int, int] | None = None,
               *, out: Mapping[Kind, Any] | None = None, as_torch: bool = False, tenant: str = "",
               transport: str | None = None, layer_major: bool = True) -> "LayerStream":
        """Like :meth:`get`, but iterate it to receive each layer index as soon as every
        requested slab of that layer has landed (or been reported missing), in order;
        ``result()`` then gives the :class:`Slabs`. Compute on layer l while later
        layers are still in flight."""
        family = self.family(family_id, tenant)
        start, end = layers or (0, family.num_layers)
        ids, tokens = entry_columns(entries)
        asm = SlabAssembler(family, tokens, kinds, start, end, out, as_torch)
        req = pb.GetSlabsRequest(tenant=tenant or self.options.tenant, family_id=family_id,
                                 entry_ids=ids, kinds=[int(k) for k in kinds], layer_start=start,
                                 layer_end=end, layer_major=layer_major)
        chosen = self._transport(transport or self.options.transport)
        frames = self._grpc_fetch(req, asm) if chosen is None else chosen.fetch(req, asm)
        return LayerStream(frames, asm, chosen.name if chosen else "grpc")

    def stream_selections(self, family_id: FamilyId, entries: Hit | Sequence[HitEntry],
                          selections: Sequence[tuple[Sequence[Kind], tuple[int, int]]], *,
                          outs: Sequence[Mapping[Kind, Any] | None] | None = None, as_torch: bool = False,
                          tenant: str = "", transport: str | None = None) -> "SelectionStream":
        """Several (kinds, (layer_start, layer_end)) selections of the same entries in one
        request, layer-major within each, selection after selection (``outs[i]``: the
        destination of selection i, as ``out`` of :meth:`stream`). Iterate it for
        (selection index, layer) as each layer of a selection completes; ``results()``
        then gives one :class:`Slabs` per selection. What a reuse plan loads (E of a
        group, K/V of the reused ranges) is one fetch, not one per range."""
        family = self.family(family_id, tenant)
        ids, tokens = entry_columns(entries)
        outs = list(outs) if outs is not None else [None] * len(selections)
        parts = [SlabAssembler(family, tokens, kinds, start, end or family.num_layers, out, as_torch)
                 for (kinds, (start, end)), out in zip(selections, outs, strict=True)]
        req = pb.GetSlabsRequest(tenant=tenant or self.options.tenant, family_id=family_id, entry_ids=ids,
                                 layer_major=True,
                                 selections=[pb.SlabSelection(kinds=[int(k) for k in kinds], layer_start=start,
                                                              layer_end=end) for kinds, (start, end) in selections])
        asm = SelectionAssembler(parts)
        chosen = self._transport(transport or self.options.transport)
        frames = self._grpc_fetch(req, asm) if chosen is None else chosen.fetch(req, asm)
        return SelectionStream(frames, asm, chosen.name if chosen else "grpc")

    def _grpc_fetch(self, req: pb.GetSlabsRequest, asm: SlabAssembler) -> Iterator[None]:
        try:
            for message in self._get_slabs(req, timeout=self.options.data_timeout_s):
                asm.feed(message)
                yield
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def arena(self, hit: Hit | None = None, transport: str | None = None) -> mmap.mmap | None:
        """The node's memory tier, mapped read-only, when ``transport`` (default: the
        client's) reaches the node over shm; with ``hit``, only if it is that hit's node
        (its "shm" endpoint: a restarted node has another). None otherwise. Readers of
        located hits (``lookup(..., locate=True)``) copy slabs out of it directly."""
        chosen = self._transport(transport or self.options.transport)
        if not isinstance(chosen, ShmTransport) or (hit is not None and hit.shm.decode() != chosen.address):
            return None
        return chosen.arena()

    def map_memory_tier(self, transport: str | None = None) -> int:
        """Map the node's memory tier into this process's page tables now, the pages the
        node has allocated (all of them when it prefaults; none is allocated by this);
        bytes mapped, 0 when ``transport`` does not reach the node over shm. Reading an
        entry out of pages not yet mapped costs a fault per 4 KiB (or one populate per hit,
        ~10 ms per 100 MB on this VM), so a long-running reader of located hits (an engine
        worker) calls this once at start, in a thread of its own: ~85 ms per GiB here, with
        the GIL released."""
        chosen = self._transport(transport or self.options.transport)
        return chosen.map_allocated() if isinstance(chosen, ShmTransport) else 0

    def _transport(self, name: str) -> Transport | None:
        """The transport for ``name`` ("auto", "shm", "ucx", "tcp", "grpc"); None means gRPC.
        Resolved once per name from the node's endpoints, then reused (it pools)."""
        if name == "grpc":
            return None
        with self._transports_lock:
            if name not in self._transports:
                fetch = self._call(self._stub.Stats, pb.StatsRequest()).fetch
                self._transports[name] = choose_transport(name, fetch, self.target, self.options)
            return self._transports[name]

    # -- housekeeping

    def delete(self, family_id: FamilyId, *, entry_ids: Sequence[bytes] = (),
               chunk_hashes: Sequence[bytes] = (), producer: str = "", tenant: str = "") -> int:
        req = pb.DeleteRequest(tenant=tenant or self.options.tenant, family_id=family_id,
                               entry_ids=entry_ids, chunk_hashes=chunk_hashes, producer=producer)
        return self._call(self._stub.Delete, req).entries_deleted

    def pin(self, family_id: FamilyId, entry_ids: Sequence[bytes], ttl_s: int, tenant: str = "") -> str:
        req = pb.PinRequest(tenant=tenant or self.options.tenant, family_id=family_id,
                            entry_ids=entry_ids, ttl_s=ttl_s)
        return self._call(self._stub.Pin, req).lease_id

    def unpin(self, lease_id: str) -> None:
        local = self._local()
        self._socket_or_grpc(local, local and local.unpin, self._stub.Unpin, pb.UnpinRequest(lease_id=lease_id))

    def list_entries(self, *, family_id: FamilyId = NO_FAMILY, producer: ModelId = NO_MODEL, tenant: str = "",
                     limit: int = 100, page_token: str = "") -> tuple[list[StoredEntry], str]:
        req = pb.ListEntriesRequest(tenant=tenant, family_id=family_id, producer=producer,
                                    limit=limit, page_token=page_token)
        resp = self._call(self._stub.ListEntries, req)
        return entries_from_proto(resp), resp.next_page_token

    def stats(self) -> dict:
        return stats_to_dict(self._call(self._stub.Stats, pb.StatsRequest()))


def stats_to_dict(resp: pb.StatsResponse) -> dict:
    tiers = {pb.Tier.Name(t.tier).removeprefix("TIER_").lower(): {
        "capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes,
        "reserved_bytes": t.reserved_bytes, "entries": t.entries, "evictions": t.evictions}
        for t in resp.tiers}
    return {"node_id": resp.node_id, "chunk_size": resp.chunk_size, "entries": resp.entries,
            "models": resp.models, "open_reservations": resp.open_reservations,
            "uptime_s": resp.uptime_s, **tiers, "counters": dict(sorted(resp.counters.items()))}



class _FrameStream:
    """A fetch in progress: iterate it for what completes as frames arrive (what the
    assembler's ``take_completed_layers`` says); ``transport`` says which path moved
    the bytes."""

    def __init__(self, frames: Iterator[None], asm: Any, transport: str) -> None:
        self._frames = frames
        self._asm = asm
        self.transport = transport

    def __iter__(self) -> Iterator[Any]:
        for _ in self._frames:
            yield from self._asm.take_completed_layers()
        yield from self._asm.take_completed_layers()


class SelectionStream(_FrameStream):
    """Iterate for (selection index, layer) as each completes; ``results()`` once exhausted."""

    def missing(self, selection: int) -> list:
        """Selection ``selection``'s misses so far (a layer yielded with one is not whole)."""
        return list(self._asm.parts[selection].missing)

    def arrays(self, selection: int) -> dict[Kind, Any]:
        """Selection ``selection``'s destination arrays, filling as layers complete."""
        return self._asm.parts[selection].arrays

    def results(self) -> list[Slabs]:
        out = [part.result() for part in self._asm.parts]
        for slabs in out:
            slabs.transport = self.transport
        return out


class LayerStream(_FrameStream):
    """Iterate for completed layer indices (ascending); ``result()`` once exhausted."""

    @property
    def arrays(self) -> dict[Kind, Any]:
        """The destination arrays, filling as layers complete (``[layers, tokens, ...]``)."""
        return self._asm.arrays

    def result(self) -> Slabs:
        slabs = self._asm.result()
        slabs.transport = self.transport
        return slabs
