"""gRPC servicer: converts proto <-> domain types and domain errors <-> status codes.
Nothing here decides anything; the store does."""

from __future__ import annotations

import functools
import inspect
import logging
import struct
from collections.abc import Callable, Iterator

import grpc

from cachesvc.wire import errors
from cachesvc.node.entries import EntryMeta, SlabSpec
from cachesvc.wire.layout import Layout
from cachesvc.wire.framing import decode_write_chunk, encode_slab_run, slab_run_header
from cachesvc.wire.keys import DEFAULT_TENANT, DType, FamilySpec, Kind, check_chunk_hashes
from cachesvc.node.auth import TokenTable, authorize, bearer
from cachesvc.node.cluster import ClusterAgent, check_cluster_lookup
from cachesvc.wire.cluster import Member
from cachesvc.node.metrics import RPC_SECONDS
from cachesvc.node.models import ModelRecord
from cachesvc.node.profiles import ProfileRecord
from cachesvc.node.records import EntryInput
from cachesvc.node.store import CacheStore
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.v1 import cachesvc_pb2_grpc as pb_grpc
from cachesvc.wire.convert import (anchor_to_proto, delta_from_proto, family_from_proto, family_to_proto,
                                   source_from_proto, source_to_proto)

log = logging.getLogger(__name__)

def _status_for(exc: errors.CacheError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.status]


def _maps_errors(method: Callable) -> Callable:
    """Authorize the caller (a node with API tokens: cachesvc.node.auth), turn domain
    errors into a gRPC status with the error's message, for unary and streaming handlers
    alike; and time every call (metrics.RPC_SECONDS)."""
    name = method.__name__
    seconds = RPC_SECONDS.labels(name)
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            with seconds.time():
                try:
                    self.authorize(name, request, context)
                    yield from method(self, request, context)
                except errors.CacheError as exc:
                    context.abort(_status_for(exc), str(exc))
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        with seconds.time():
            try:
                self.authorize(name, request, context)
                return method(self, request, context)
            except errors.CacheError as exc:
                context.abort(_status_for(exc), str(exc))
    return unary


def _family(msg: pb.FamilySpec) -> FamilySpec:
    try:
        return family_from_proto(msg)
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc)) from None


def _model_to_proto(rec: ModelRecord) -> pb.GetModelResponse:
    return pb.GetModelResponse(
        model=pb.ModelSpec(model_id=rec.model_id, weights_digest=rec.weights_digest,
                           family=family_to_proto(rec.family)),
        family_id=rec.family_id)


def _profile_to_proto(rec: ProfileRecord) -> pb.ProfileSpec:
    return pb.ProfileSpec(producer=rec.producer, consumer=rec.consumer, producer_digest=rec.producer_digest,
                          consumer_digest=rec.consumer_digest, document=rec.document)


def _slab_from_proto(msg: pb.SlabSpec, where: str) -> SlabSpec:
    try:
        kind, dtype = Kind(msg.kind), DType(msg.dtype)
    except ValueError:
        raise errors.InvalidArgument(f"{where}: kind {msg.kind} or dtype {msg.dtype} is not "
                                     "a known value") from None
    return SlabSpec(kind, msg.layer, tuple(msg.shape), dtype, msg.checksum)


def _layout_to_proto(layout: Layout) -> pb.EntryLayout:
    return pb.EntryLayout(num_tokens=layout.num_tokens, k_layers=layout.k_layers,
                          v_layers=layout.v_layers, e_layers=layout.e_layers)


def reserve_response(store: CacheStore, request: pb.ReserveRequest) -> pb.ReserveResponse:
    """A Reserve answered, over gRPC or the same-host data plane (raises CacheError)."""
    entries = [EntryInput(e.chunk_hash, e.position_offset, e.num_tokens,
                          [_slab_from_proto(s, f"entries[{i}].slabs[{j}]") for j, s in enumerate(e.slabs)],
                          e.parent_hash)
               for i, e in enumerate(request.entries)]
    res = store.reserve(request.tenant, request.family_id, request.producer, entries, request.ttl_s,
                        request.producer_digest)
    targets = [pb.EntryWriteTarget(entry_index=i, size_bytes=meta.size_bytes,
                                   slab_offsets=_request_order_offsets(meta, request.entries[i]),
                                   already_present=present)
               for i, (meta, present) in enumerate(zip(res.entries, res.already_present, strict=True))]
    return pb.ReserveResponse(reservation_id=res.reservation_id, targets=targets,
                              expires_in_ms=int(res.expires_in_s * 1000))


def commit_response(store: CacheStore, cluster: ClusterAgent | None, request: pb.CommitRequest) -> pb.CommitResponse:
    """A Commit answered, over gRPC or the same-host data plane (raises CacheError)."""
    committed = store.commit(request.reservation_id)
    if cluster is not None:
        cluster.flush()    # in the global index before the client hears "committed"
    return pb.CommitResponse(entries_committed=committed)


def lookup_response(store: CacheStore, request: pb.LookupRequest, fetch: pb.FetchDescriptor) -> pb.LookupResponse:
    """A Lookup answered, over gRPC or the same-host data plane (raises CacheError)."""
    if request.cluster:
        raise errors.FailedPrecondition("cluster lookups go over gRPC to a node started with --redis-url")
    result = store.lookup(request.tenant, request.family_id, request.chunk_hashes, request.consumer,
                          request.producers, request.lease_ttl_s, request.tail_hashes, request.offer_tails,
                          request.locate)
    resp = pb.LookupResponse(lease_id=result.lease_id)
    layout_index: dict[int, int] = {}

    def index_of(meta: EntryMeta) -> int:
        idx = layout_index.get(id(meta.layout))
        if idx is None:
            idx = layout_index[id(meta.layout)] = len(resp.layouts)
            resp.layouts.append(_layout_to_proto(meta.layout))
        return idx

    for hit in result.hits:
        resp.hits.add(producer=hit.producer, same_model=hit.same_model,
                      num_chunks=len(hit.metas),
                      entry_ids=b"".join(m.entry_id for m in hit.metas),
                      position_offsets=[m.position_offset for m in hit.metas],
                      layout_indices=[index_of(m) for m in hit.metas], tiers=hit.tiers, fetch=fetch,
                      tail_chunk_hashes=b"".join(m.chunk_hash for m in hit.tails),
                      tail_entry_ids=b"".join(m.entry_id for m in hit.tails),
                      tail_position_offsets=[m.position_offset for m in hit.tails],
                      tail_layout_indices=[index_of(m) for m in hit.tails], tail_tiers=hit.tail_tiers,
                      arena_offsets=hit.arena_offsets, tail_arena_offsets=hit.tail_arena_offsets)
        if request.locate:
            resp.hits[-1].slab_checksums = _checksums(hit.metas)
            resp.hits[-1].tail_slab_checksums = _checksums(hit.tails)
    return resp


def cluster_lookup_response(store: CacheStore, cluster: ClusterAgent, request: pb.LookupRequest
                            ) -> pb.LookupResponse:
    """A Lookup with ``cluster`` answered from the global index: per hit chunk (and per
    offered tail), the nodes holding it."""
    check_cluster_lookup(request.lease_ttl_s, request.tail_hashes, request.locate)
    try:
        check_chunk_hashes(request.chunk_hashes)
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc)) from None
    store.get_family(request.family_id)    # NotFound for a family no node registered
    hits, members = cluster.lookup(request.tenant or DEFAULT_TENANT, request.family_id, request.chunk_hashes,
                                   request.producers, request.offer_tails)
    resp = pb.LookupResponse()
    layout_index: dict[Layout, int] = {}
    node_index: dict[str, int] = {}

    def owner_columns(owner_lists) -> tuple[list[int], list[int]]:
        counts, nodes = [], []
        for owners in owner_lists:
            counts.append(len(owners))
            for node_id in owners:
                if node_id not in node_index:
                    node_index[node_id] = len(resp.nodes)
                    resp.nodes.append(_descriptor(members[node_id]))
                nodes.append(node_index[node_id])
        return counts, nodes

    def layout_of(layout: Layout) -> int:
        if layout not in layout_index:
            layout_index[layout] = len(resp.layouts)
            resp.layouts.append(_layout_to_proto(layout))
        return layout_index[layout]

    for hit in hits:
        counts, nodes = owner_columns(hit.owners)
        tails = [rec for rec, _ in hit.tails]
        tail_counts, tail_nodes = owner_columns(owners for _, owners in hit.tails)
        resp.hits.add(producer=hit.producer, same_model=bool(request.consumer) and hit.producer == request.consumer,
                      num_chunks=len(hit.entry_ids), entry_ids=b"".join(hit.entry_ids),
                      position_offsets=hit.position_offsets, layout_indices=[layout_of(x) for x in hit.layouts],
                      tiers=hit.tiers, owner_counts=counts, owner_nodes=nodes,
                      tail_chunk_hashes=b"".join(r.chunk_hash for r in tails),
                      tail_entry_ids=b"".join(r.entry_id for r in tails),
                      tail_position_offsets=[r.position_offset for r in tails],
                      tail_layout_indices=[layout_of(r.layout) for r in tails], tail_tiers=[r.tier for r in tails],
                      tail_owner_counts=tail_counts, tail_owner_nodes=tail_nodes)
    return resp


def _descriptor(member: Member) -> pb.FetchDescriptor:
    """Where a cluster member is, as lookups hand it out."""
    return pb.FetchDescriptor(node_id=member.node_id, grpc_address=member.grpc_address,
                              transports=member.transports, host_id=member.host_id)


def _checksums(metas: list[EntryMeta]) -> bytes:
    """Every slab's xxh3-64 of these entries, entry after entry in payload order (u64 LE)."""
    sums = [slab.checksum for meta in metas for slab in meta.slabs]
    return struct.pack(f"<{len(sums)}Q", *sums)


def _kinds(values) -> list[Kind]:
    try:
        return [Kind(v) for v in values]
    except ValueError:
        raise errors.InvalidArgument(f"kinds {list(values)} contain an unknown value") from None


def selections_of(request: pb.GetSlabsRequest) -> list[tuple[list[Kind], int, int]]:
    """The (kinds, layer_start, layer_end) selections a GetSlabsRequest asks for: its
    ``selections``, or the one its top-level fields make."""
    if not request.selections:
        return [(_kinds(request.kinds), request.layer_start, request.layer_end)]
    if request.kinds or request.layer_start or request.layer_end:
        raise errors.InvalidArgument("give kinds and layers either in the GetSlabsRequest's own fields or in "
                                     "its selections, not both")
    return [(_kinds(s.kinds), s.layer_start, s.layer_end) for s in request.selections]


class CacheServicer(pb_grpc.CacheServiceServicer):
    def __init__(self, store: CacheStore, fetch: pb.FetchDescriptor, cluster: ClusterAgent | None = None,
                 tokens: TokenTable | None = None) -> None:
        self.store = store
        self.fetch = fetch    # this node's endpoints, handed out with every hit
        self.cluster = cluster
        self.tokens = tokens  # None: no authentication

    def authorize(self, method: str, request, context) -> None:
        """Bind the call to its token's tenant and check its role (no-op without tokens)."""
        if self.tokens is not None:
            authorize(self.tokens.principal(bearer(context.invocation_metadata())), method, request)

    @_maps_errors
    def RegisterModel(self, request, context):
        m = request.model
        register = self.cluster.register_model if self.cluster is not None else self.store.register_model
        reg = register(m.model_id, m.weights_digest, _family(m.family), request.replace, request.tenant)
        return pb.RegisterModelResponse(family_id=reg.record.family_id, created=reg.created,
                                        chunk_size=self.store.config.chunk_size)

    @_maps_errors
    def GetModel(self, request, context):
        return _model_to_proto(self.store.get_model(request.model_id, request.tenant))

    @_maps_errors
    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[_model_to_proto(r) for r in self.store.list_models(request.tenant)])

    @_maps_errors
    def PutProfile(self, request, context):
        m = request.profile
        put = self.cluster.put_profile if self.cluster is not None else self.store.put_profile
        rec = put(m.producer, m.consumer, m.producer_digest, m.consumer_digest, m.document, request.tenant)
        return pb.PutProfileResponse(version=rec.version, replaced=rec.version > 1)

    @_maps_errors
    def GetProfile(self, request, context):
        rec = self.store.get_profile(request.producer, request.consumer, request.tenant)
        return pb.GetProfileResponse(profile=_profile_to_proto(rec), version=rec.version, flagged=rec.flagged)

    @_maps_errors
    def FlagProfile(self, request, context):
        applied, flags = self.store.flag_profile(request.producer, request.consumer, request.version,
                                                 request.reason, request.tenant)
        return pb.FlagProfileResponse(applied=applied, flags=flags)

    @_maps_errors
    def ListProfiles(self, request, context):
        return pb.ListProfilesResponse(profiles=[
            pb.ProfileInfo(producer=r.producer, consumer=r.consumer, producer_digest=r.producer_digest,
                           consumer_digest=r.consumer_digest, version=r.version, stale=stale,
                           size_bytes=len(r.document), flagged=r.flagged, flags=r.flags)
            for r, stale in self.store.list_profiles(request.producer, request.consumer, request.tenant)])

    @_maps_errors
    def Reserve(self, request, context):
        return reserve_response(self.store, request)

    @_maps_errors
    def WriteSlabs(self, request_iterator, context):
        """Requests arrive as raw bytes (see cachesvc.wire.framing): the payload is copied
        once, from the received buffer into the arena."""
        seen: set[str] = set()
        received = 0
        try:
            for raw in request_iterator:
                try:
                    chunk = decode_write_chunk(raw)
                except ValueError as exc:
                    raise errors.InvalidArgument(f"malformed WriteChunk: {exc}") from None
                seen.add(chunk.reservation_id)
                self.store.write(chunk.reservation_id, chunk.entry_index, chunk.offset, chunk.data)
                received += len(chunk.data)
        except grpc.RpcError:
            self._abort_broken(seen)
            raise
        if not context.is_active():
            # A writer that dies can also look like a stream that simply ended.
            self._abort_broken(seen)
        return pb.WriteSlabsResponse(bytes_received=received)

    def _abort_broken(self, reservations: set[str]) -> None:
        """The writer went away mid-put: nothing it wrote may become visible, and its
        memory comes back now rather than at expiry."""
        for reservation in reservations:
            try:
                self.store.abort(reservation)
            except errors.NotFound:
                pass
        log.warning("write stream broken; reservation aborted",
                    extra={"reservations": sorted(reservations)})

    @_maps_errors
    def Commit(self, request, context):
        return commit_response(self.store, self.cluster, request)

    @_maps_errors
    def Abort(self, request, context):
        self.store.abort(request.reservation_id)
        return pb.AbortResponse()

    @_maps_errors
    def Lookup(self, request, context):
        if request.cluster:
            if self.cluster is None:
                raise errors.FailedPrecondition("this node is not in a cluster (started without --redis-url)")
            return cluster_lookup_response(self.store, self.cluster, request)
        return lookup_response(self.store, request, self.fetch)

    @_maps_errors
    def ListNodes(self, request, context):
        if self.cluster is None:
            raise errors.FailedPrecondition("this node is not in a cluster (started without --redis-url)")
        members = self.cluster.members() if self.cluster.status.redis_up else {}
        return pb.ListNodesResponse(nodes=[_descriptor(m) for m in sorted(members.values(), key=lambda m: m.node_id)],
                                    redis_up=self.cluster.status.redis_up, namespace=self.cluster.keys.ns)

    @_maps_errors
    def GetSlabs(self, request, context) -> Iterator[bytes]:
        """Yields encoded SlabRun messages (cachesvc.wire.framing): each payload is copied
        once, from the arena into the message, while the store holds the entry."""
        with self.store.read_selections(request.tenant, request.family_id, request.entry_ids,
                                        selections_of(request), request.layer_major) as runs:
            for run in runs:
                yield encode_slab_run(slab_run_header(run), run.data)

    @_maps_errors
    def Delete(self, request, context):
        n = self.store.delete(request.tenant, request.family_id, request.entry_ids,
                              request.chunk_hashes, request.producer)
        return pb.DeleteResponse(entries_deleted=n)

    @_maps_errors
    def Pin(self, request, context):
        lease_id, n = self.store.pin(request.tenant, request.family_id, request.entry_ids,
                                     request.ttl_s)
        return pb.PinResponse(lease_id=lease_id, entries_pinned=n)

    @_maps_errors
    def Unpin(self, request, context):
        self.store.unpin(request.lease_id)
        return pb.UnpinResponse()

    @_maps_errors
    def ListEntries(self, request, context):
        page, token = self.store.list_entries(request.tenant, request.family_id, request.producer,
                                              request.limit, request.page_token)
        return pb.ListEntriesResponse(entries=[_entry_info(m, t, p) for m, t, p in page],
                                      next_page_token=token)

    @_maps_errors
    def Stats(self, request, context):
        s = self.store.stats()
        tiers = [pb.TierStats(tier=tier, **{k: v for k, v in s[name].items() if k != "free_extents"})
                 for tier, name in ((pb.TIER_MEMORY, "memory"), (pb.TIER_DISK, "disk"))]
        return pb.StatsResponse(node_id=s["node_id"], chunk_size=s["chunk_size"], tiers=tiers,
                                entries=s["entries"], models=s["models"],
                                open_reservations=s["open_reservations"],
                                counters=s["counters"] | (self.cluster.stats() if self.cluster else {}),
                                uptime_s=s["uptime_s"], fetch=self.fetch)

    # ------------------------------------------------------------ cross-context reuse

    @_maps_errors
    def PutSegment(self, request, context):
        n = self.store.cross.put_segment(request.tenant, request.family_id, request.segment_key,
                                         source_from_proto(request.source))
        return pb.PutSegmentResponse(sources=n)

    @_maps_errors
    def FindSegments(self, request, context):
        found = self.store.cross.find_segments(request.tenant, request.family_id, request.segment_keys,
                                               request.max_sources)
        return pb.FindSegmentsResponse(segments=[
            pb.SegmentSources(segment_key=k, sources=[source_to_proto(s) for s in sources])
            for k, sources in zip(request.segment_keys, found, strict=True)])

    @_maps_errors
    def AdmitAnchor(self, request, context):
        a = request.anchor
        admitted, evicted = self.store.cross.admit_anchor(request.tenant, request.family_id, request.placeholder,
                                                          a.segment_key, a.length, source_from_proto(a.base))
        return pb.AdmitAnchorResponse(admitted=admitted, evicted=evicted)

    @_maps_errors
    def RecordAnchor(self, request, context):
        evicted = self.store.cross.record_anchor(request.tenant, request.family_id, request.placeholder,
                                                 request.segment_key, delta_from_proto(request.delta))
        return pb.RecordAnchorResponse(evicted=evicted)

    @_maps_errors
    def FindAnchors(self, request, context):
        found = self.store.cross.find_anchors(request.tenant, request.family_id, request.placeholder,
                                              request.min_length)
        return pb.FindAnchorsResponse(anchors=[anchor_to_proto(a) for a in found])

    @_maps_errors
    def ActivateAnchors(self, request, context):
        n = self.store.cross.activate(request.tenant, request.family_id, request.placeholder, request.segment_keys)
        return pb.ActivateAnchorsResponse(activated=n)


def _request_order_offsets(meta: EntryMeta, spec: pb.EntrySpec) -> list[int]:
    where = {(s.kind, s.layer): s.offset for s in meta.slabs}
    return [where[(Kind(s.kind), s.layer)] for s in spec.slabs]


def _entry_info(meta: EntryMeta, tier, pinned: bool) -> pb.EntryInfo:
    return pb.EntryInfo(entry_id=meta.entry_id, tenant=meta.tenant, family_id=meta.family_id,
                        chunk_hash=meta.chunk_hash, producer=meta.producer,
                        position_offset=meta.position_offset, layout=_layout_to_proto(meta.layout),
                        size_bytes=meta.size_bytes, tier=int(tier), pinned=pinned)
