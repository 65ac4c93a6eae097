"""Transport-free half of the SDK: records, request building, and assembly of fetched
slabs into caller buffers. The sync and asyncio clients only move these messages.

Arrays are handled as raw bytes (``uint8`` views), so every dtype — bfloat16 and fp8
included — takes the same path, and torch tensors are written in place through
``tensor.view(torch.uint8).numpy()`` without a copy.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import xxhash

from cachesvc.wire.keys import (CHUNK_HASH_BYTES, ENTRY_ID_BYTES, ChunkHash, DType, EntryId, FamilyId, FamilySpec,
                                Kind, ModelId, Tier)
from cachesvc.wire.layout import Layout
from cachesvc.wire.framing import decode_slab_run, encode_write_chunk, passthrough
from cachesvc.v1 import cachesvc_pb2 as pb

WRITE_PIECE_BYTES = 1 << 20
"""Target size of one WriteChunk message."""

NUMPY_DTYPES: dict[DType, np.dtype] = {
    DType.FLOAT32: np.dtype(np.float32), DType.FLOAT16: np.dtype(np.float16),
    DType.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    DType.FLOAT8_E4M3FN: np.dtype(ml_dtypes.float8_e4m3fn),
    DType.FLOAT8_E5M2: np.dtype(ml_dtypes.float8_e5m2),
    DType.INT8: np.dtype(np.int8), DType.UINT8: np.dtype(np.uint8),
}


# ---------------------------------------------------------------- records

@dataclass(frozen=True, slots=True)
class Registered:
    family_id: FamilyId
    chunk_size: int        # the server's tokens per chunk: hash prompts with it
    created: bool          # False when the identical model was already registered


@dataclass(frozen=True, slots=True)
class StoredProfile:
    """A reuse profile as the service holds it: the JSON ``document`` the connectors
    write, measured on the two weights digests; ``stale`` once either model changed;
    ``flagged`` (a reason) once a consumer's drift guard asked for re-profiling."""

    producer: ModelId
    consumer: ModelId
    producer_digest: str
    consumer_digest: str
    version: int
    document: dict | None = None    # None in listings
    stale: bool = False
    size_bytes: int = 0
    flagged: str = ""
    flags: int = 0


@dataclass(frozen=True, slots=True)
class EntryData:
    """One chunk's slabs to put. Arrays are token-major: K/V ``[tokens, kv_heads,
    head_dim]``, E ``[tokens, hidden]``, in the family dtype (numpy or CPU torch)."""

    chunk_hash: bytes
    slabs: Mapping[tuple[Kind, int], Any]   # (kind, layer) -> array
    position_offset: int = 0
    # A partial chunk's parent in the chain (the hash before it, or the chain's root), so
    # that lookups offer it to prompts that continue past it (CacheClient.lookup_prompt).
    parent_hash: bytes = b""


@dataclass(frozen=True, slots=True)
class PutResult:
    entries_committed: int    # newly visible entries
    already_present: int      # identical entries that were already stored
    bytes_sent: int


@dataclass(frozen=True, slots=True)
class HitEntry:
    entry_id: EntryId
    position_offset: int
    layout: Layout
    tier: Tier


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One entry as ``list_entries`` shows it."""

    entry_id: EntryId
    tenant: str
    family_id: FamilyId
    chunk_hash: ChunkHash
    producer: ModelId
    position_offset: int
    layout: Layout
    size_bytes: int
    tier: Tier
    pinned: bool              # held by a lease


@dataclass(frozen=True, slots=True)
class Location:
    """Where an entry's payload lies in its node's memory tier (a locating lookup), for a
    reader on the node's host: ``arena_offset`` into the arena the "shm" transport maps
    (-1: the entry is only on disk), and every slab's xxh3-64 in payload order."""

    arena_offset: int
    checksums: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TailOffer:
    """A partial chunk the service offers after a hit's run (a lookup with
    ``offer_tails``): a hit only once the client's own tokens hash to ``chunk_hash``."""

    chunk_hash: bytes
    entry_id: EntryId
    position_offset: int
    layout: Layout
    tier: Tier
    location: Location | None = None
    owners: tuple[str, ...] = ()      # a cluster lookup's: the nodes holding it


@dataclass(frozen=True, slots=True)
class Hit:
    """One producer's hits, columnar: chunk i of the looked-up prompt is covered by
    ``entry_ids[i]`` (with ``position_offsets[i]``, ``layouts[i]``, ``tiers[i]``).
    ``hit[:k]`` is the hit cut to its first k chunks; ``entries`` builds per-entry
    records on demand. ``tails``: partial chunks offered after the run, longest first,
    not yet verified (``with_tail`` appends one that was). After a locating lookup,
    ``locations[i]`` says where entry i lies in the memory tier of the node whose "shm"
    endpoint is ``shm`` (None otherwise)."""

    producer: ModelId
    same_model: bool
    entry_ids: list[EntryId]
    position_offsets: list[int]
    layouts: list[Layout]
    tiers: list[Tier]
    grpc_address: str      # where to fetch
    tails: tuple[TailOffer, ...] = ()
    locations: list[Location] | None = None
    shm: bytes = b""
    # From a cluster lookup: per entry, the node ids holding it (LookupResult.nodes says
    # where they are); empty from one node's lookup (``grpc_address`` holds everything).
    owners: tuple[tuple[str, ...], ...] = ()

    def with_tail(self, offer: TailOffer) -> "Hit":
        """This hit extended by a verified offer (and no further offers)."""
        located = self.locations is not None and offer.location is not None
        return Hit(self.producer, self.same_model, [*self.entry_ids, offer.entry_id],
                   [*self.position_offsets, offer.position_offset], [*self.layouts, offer.layout],
                   [*self.tiers, offer.tier], self.grpc_address, (),
                   [*self.locations, offer.location] if located else None, self.shm,
                   (*self.owners, offer.owners) if offer.owners else self.owners)

    @property
    def num_chunks(self) -> int:
        return len(self.entry_ids)

    @property
    def num_tokens(self) -> int:
        return sum(lay.num_tokens for lay in self.layouts)

    @property
    def entries(self) -> list[HitEntry]:
        return [HitEntry(*row) for row in zip(self.entry_ids, self.position_offsets,
                                              self.layouts, self.tiers, strict=True)]

    def __getitem__(self, chunks: slice) -> "Hit":
        if not isinstance(chunks, slice):
            raise TypeError("index a Hit with a slice, e.g. hit[:k]; use hit.entries[i] for one")
        return Hit(self.producer, self.same_model, self.entry_ids[chunks],
                   self.position_offsets[chunks], self.layouts[chunks], self.tiers[chunks],
                   self.grpc_address, (), self.locations[chunks] if self.locations is not None else None,
                   self.shm, self.owners[chunks])


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A cluster member: where its gRPC and data-plane endpoints are."""

    node_id: str
    grpc_address: str
    host_id: str
    transports: dict[str, bytes] = field(repr=False)

    @classmethod
    def from_proto(cls, d: pb.FetchDescriptor) -> "NodeInfo":
        return cls(d.node_id, d.grpc_address, d.host_id, dict(d.transports))


@dataclass(frozen=True, slots=True)
class LookupResult:
    hits: list[Hit]        # longest first
    lease_id: str          # "" unless a lease was asked for and something hit
    nodes: dict[str, NodeInfo] = field(default_factory=dict)   # a cluster lookup's owners

    def best(self, producer: str | None = None) -> Hit | None:
        for hit in self.hits:
            if producer is None or hit.producer == producer:
                return hit
        return None


@dataclass(frozen=True, slots=True)
class Missing:
    entry_index: int
    kind: Kind
    layer_start: int
    num_layers: int
    reason: str


@dataclass(slots=True)
class Slabs:
    """Fetched slabs: ``arrays[kind]`` is ``[num_layers, total_tokens, ...]``.

    ``valid_chunks`` is how many leading entries arrived whole and checksum-clean for
    every requested kind and layer; use only those (recompute the rest).
    """

    arrays: dict[Kind, Any]
    layer_start: int
    layer_end: int
    token_offsets: list[int]   # token_offsets[i]: first token of entry i in the arrays
    valid_chunks: int
    missing: list[Missing] = field(default_factory=list)
    bytes_received: int = 0
    transport: str = ""        # which path moved the bytes: "shm", "ucx", "tcp" or "grpc"

    @property
    def complete(self) -> bool:
        return not self.missing


# ---------------------------------------------------------------- conversions

_TIERS = {int(t): t for t in Tier}   # proto enum value -> Tier (one map() per lookup hit)


def layout_from_proto(lay: pb.EntryLayout) -> Layout:
    return Layout(lay.num_tokens, tuple(lay.k_layers), tuple(lay.v_layers), tuple(lay.e_layers))


def entries_from_proto(resp: pb.ListEntriesResponse) -> list[StoredEntry]:
    return [StoredEntry(EntryId(e.entry_id), e.tenant, FamilyId(e.family_id), ChunkHash(e.chunk_hash),
                        ModelId(e.producer), e.position_offset, layout_from_proto(e.layout), e.size_bytes,
                        _TIERS[e.tier], e.pinned) for e in resp.entries]


def lookup_from_proto(resp: pb.LookupResponse) -> LookupResult:
    layouts = [layout_from_proto(lay) for lay in resp.layouts]
    hits = []
    for h in resp.hits:
        blob, n = h.entry_ids, h.num_chunks
        ids = [blob[i:i + ENTRY_ID_BYTES] for i in range(0, n * ENTRY_ID_BYTES, ENTRY_ID_BYTES)]
        hit_layouts = [layouts[i] for i in h.layout_indices]
        tail_layouts = [layouts[i] for i in h.tail_layout_indices]
        # A locating lookup answers an offset per entry and per tail (an older node none).
        located = len(h.arena_offsets) == n and len(h.tail_arena_offsets) == len(tail_layouts)
        locations = _locations(h.arena_offsets, h.slab_checksums, hit_layouts) if located else None
        tail_locations = _locations(h.tail_arena_offsets, h.tail_slab_checksums, tail_layouts) if located else None
        tail_owners = _owners(h.tail_owner_counts, h.tail_owner_nodes, len(tail_layouts), resp.nodes)
        tails = tuple(TailOffer(h.tail_chunk_hashes[i * CHUNK_HASH_BYTES:(i + 1) * CHUNK_HASH_BYTES],
                                h.tail_entry_ids[i * ENTRY_ID_BYTES:(i + 1) * ENTRY_ID_BYTES], offset,
                                tail_layouts[i], _TIERS[tier], tail_locations[i] if tail_locations else None,
                                tail_owners[i] if tail_owners else ())
                      for i, (offset, tier) in enumerate(zip(h.tail_position_offsets, h.tail_tiers, strict=True)))
        hits.append(Hit(h.producer, h.same_model, ids, list(h.position_offsets), hit_layouts,
                        list(map(_TIERS.__getitem__, h.tiers)), h.fetch.grpc_address, tails, locations,
                        h.fetch.transports.get("shm", b""), _owners(h.owner_counts, h.owner_nodes, n, resp.nodes)))
    nodes = {d.node_id: NodeInfo.from_proto(d) for d in resp.nodes}
    return LookupResult(hits, resp.lease_id, nodes)


def _owners(counts: Sequence[int], indices: Sequence[int], entries: int,
            nodes: Sequence[pb.FetchDescriptor]) -> tuple[tuple[str, ...], ...]:
    """Per entry, the ids of the nodes holding it (a cluster lookup; () otherwise)."""
    if not counts:
        return ()
    if len(counts) != entries or sum(counts) != len(indices) or any(i >= len(nodes) for i in indices):
        raise ValueError("cluster lookup answer: owner lists do not match the hit")
    out, at = [], 0
    for count in counts:
        out.append(tuple(nodes[i].node_id for i in indices[at:at + count]))
        at += count
    return tuple(out)


def _locations(offsets: Sequence[int], checksums: bytes, layouts: Sequence[Layout]) -> list[Location] | None:
    """Per entry, its Location; None if the checksums do not add up to the layouts (a
    node that answered without them: the reader then fetches instead)."""
    counts = [lay.num_slabs for lay in layouts]
    if len(checksums) != 8 * sum(counts):
        return None
    sums = struct.unpack(f"<{sum(counts)}Q", checksums)
    out, at = [], 0
    for offset, count in zip(offsets, counts, strict=True):
        out.append(Location(offset, sums[at:at + count]))
        at += count
    return out


def entry_columns(entries: "Hit | Sequence[HitEntry]") -> tuple[list[EntryId], list[int]]:
    """Entry ids and token counts of a Hit (fast) or of a list of HitEntry."""
    if isinstance(entries, Hit):
        return entries.entry_ids, [lay.num_tokens for lay in entries.layouts]
    return [e.entry_id for e in entries], [e.layout.num_tokens for e in entries]


def byte_view(array: Any) -> memoryview:
    """A zero-copy byte view of a C-contiguous numpy array or CPU torch tensor."""
    if hasattr(array, "detach"):   # torch, imported lazily by whoever made the tensor
        if array.device.type != "cpu":
            raise ValueError("only CPU tensors can be sent; move it with .cpu() first")
        if not array.is_contiguous():
            raise ValueError("tensor is not contiguous; call .contiguous() first")
        import torch
        array = array.detach().reshape(-1).view(torch.uint8).numpy()
    arr = np.asarray(array)
    if not arr.flags.c_contiguous:
        raise ValueError("array is not C-contiguous; use np.ascontiguousarray first")
    return memoryview(arr.reshape(-1).view(np.uint8))


def _dtype_of(array: Any) -> str:
    return str(array.dtype).rsplit(".", 1)[-1]


# ---------------------------------------------------------------- put

@dataclass(slots=True)
class PutPlan:
    """Reserve request plus the payload views of each entry, in payload order."""

    request: pb.ReserveRequest
    payloads: list[list[memoryview]]   # per entry, slab views sorted by (kind, layer)


def plan_put(tenant: str, family_id: str, family: FamilySpec, producer: str,
             entries: Sequence[EntryData], ttl_s: int = 0) -> PutPlan:
    """Checksum each slab and describe the put. Raises ValueError for arrays that cannot
    be what the family expects (the server checks shapes again and authoritatively)."""
    req = pb.ReserveRequest(tenant=tenant, family_id=family_id, producer=producer, ttl_s=ttl_s)
    payloads: list[list[memoryview]] = []
    parsed: dict[Any, DType] = {}   # an array dtype -> ours, parsed once (a put has one or two)
    for i, entry in enumerate(entries):
        if not entry.slabs:
            raise ValueError(f"entries[{i}] has no slabs")
        num_tokens = {int(arr.shape[0]) for arr in entry.slabs.values()}
        if len(num_tokens) != 1:
            raise ValueError(f"entries[{i}]: slabs disagree on the token count {sorted(num_tokens)}")
        spec = req.entries.add(chunk_hash=bytes(entry.chunk_hash),
                               position_offset=entry.position_offset,
                               num_tokens=num_tokens.pop(), parent_hash=bytes(entry.parent_hash))
        views = []
        for (kind, layer), arr in sorted(entry.slabs.items(), key=lambda kv: kv[0]):
            view = byte_view(arr)
            dtype = parsed.get(arr.dtype)
            if dtype is None:
                try:
                    dtype = parsed[arr.dtype] = DType.parse(_dtype_of(arr))
                except ValueError as exc:
                    raise ValueError(f"entries[{i}] {Kind(kind).name} layer {layer}: {exc}") from None
            spec.slabs.add(kind=int(kind), layer=layer, shape=list(arr.shape), dtype=int(dtype),
                           checksum=xxhash.xxh3_64_intdigest(view))
            views.append(view)
        payloads.append(views)
    return PutPlan(req, payloads)


def write_chunks(reservation_id: str, plan: PutPlan, targets: Sequence[pb.EntryWriteTarget],
                 piece_bytes: int = WRITE_PIECE_BYTES) -> Iterator[bytes]:
    """Encoded WriteChunk messages (cachesvc.wire.framing) for every entry the server still
    needs, in payload order. Small slabs share a message of about ``piece_bytes``;
    large ones are split. Each payload byte is copied once, into its message."""
    for target in targets:
        if target.already_present:
            continue
        offset = 0
        pending: list[memoryview] = []
        pending_bytes = 0
        for view in plan.payloads[target.entry_index]:
            for start in range(0, len(view), piece_bytes):
                part = view[start:start + piece_bytes]
                pending.append(part)
                pending_bytes += len(part)
                if pending_bytes >= piece_bytes:
                    yield encode_write_chunk(reservation_id, target.entry_index, offset, pending)
                    offset += pending_bytes
                    pending, pending_bytes = [], 0
        if pending:
            yield encode_write_chunk(reservation_id, target.entry_index, offset, pending)


def bulk_methods(channel: Any) -> tuple[Any, Any]:
    """(GetSlabs, WriteSlabs) callables on a sync or aio channel that exchange framed
    bytes instead of generated messages: see cachesvc.wire.framing."""
    service = "/cachesvc.v1.CacheService/"
    get_slabs = channel.unary_stream(service + "GetSlabs",
                                     request_serializer=pb.GetSlabsRequest.SerializeToString,
                                     response_deserializer=decode_slab_run)
    write_slabs = channel.stream_unary(service + "WriteSlabs", request_serializer=passthrough,
                                       response_deserializer=pb.WriteSlabsResponse.FromString)
    return get_slabs, write_slabs


# ---------------------------------------------------------------- get

class SlabAssembler:
    """Receives SlabRun messages and writes them into per-kind destination arrays.

    Destinations are ``[num_layers, total_tokens, *per_token]`` in the family dtype; a
    run of entry i, layers [a, a+n) lands in ``dest[a-start:a-start+n, tok_i:tok_i+t_i]``.
    Every slab is checksum-verified before it counts; a failure is a miss.
    """

    def __init__(self, family: FamilySpec, num_tokens: Sequence[int], kinds: Sequence[Kind],
                 layer_start: int, layer_end: int, out: Mapping[Kind, Any] | None,
                 as_torch: bool) -> None:
        self.family = family
        self.kinds = list(kinds)
        self.start, self.end = layer_start, layer_end
        self.tokens = list(num_tokens)
        self.offsets = [int(o) for o in np.cumsum([0] + self.tokens[:-1])] if self.tokens else []
        total = sum(self.tokens)
        self.arrays: dict[Kind, Any] = {}
        self._bytes: dict[Kind, np.ndarray] = {}
        for kind in self.kinds:
            shape = (layer_end - layer_start, *family.slab_shape(kind, total))
            arr = _destination(out.get(kind) if out else None, shape, family.dtype, as_torch, kind)
            self.arrays[kind] = arr
            self._bytes[kind] = _as_bytes(arr, shape, family.dtype.itemsize)
        # layers still expected per (entry, kind); what is left at the end is missing
        self._todo = {(i, k): set(range(layer_start, layer_end))
                      for i in range(len(self.tokens)) for k in self.kinds}
        self.missing: list[Missing] = []
        self.bytes_received = 0
        self._left = dict.fromkeys(range(layer_start, layer_end), len(self.tokens) * len(self.kinds))
        self._completed: list[int] = []

    def regions(self, run: pb.SlabRun) -> list[memoryview]:
        """The destination bytes of each slab of ``run``, in layer order: a transport
        receives or copies payloads straight into them. ValueError if not requested."""
        kind, i, a, n = Kind(run.kind), run.entry_index, run.layer_start, run.num_layers
        if (i, kind) not in self._todo or not self.start <= a <= a + n <= self.end or n == 0:
            raise ValueError(f"server sent entry {i} {kind.name} layers [{a}, {a + n}), "
                             "which were not requested")
        dest, t0, t = self._bytes[kind], self.offsets[i], self.tokens[i]
        return [memoryview(dest[a - self.start + j, t0:t0 + t]).cast("B") for j in range(n)]

    def block(self, run: pb.SlabRun) -> np.ndarray:
        """The destination of ``run`` as one ``[layers, slab bytes]`` uint8 view (rows
        strided through the destination): what a same-host reader copies with one
        strided copy. Call after :meth:`fit` accepted the run."""
        dest, t0, t = self._bytes[Kind(run.kind)], self.offsets[run.entry_index], self.tokens[run.entry_index]
        a = run.layer_start - self.start
        return dest[a:a + run.num_layers, t0:t0 + t].reshape(run.num_layers, -1)

    def fit(self, run: pb.SlabRun, size: int) -> list[memoryview] | None:
        """The regions for ``run`` if its ``size`` payload bytes fit them; otherwise the
        run is recorded as a miss and None returned (a run that cannot be placed is
        never data)."""
        try:
            regions = self.regions(run)
        except ValueError:
            regions = []
        if not regions or sum(len(r) for r in regions) != size:
            self.miss(run, "run does not fit the request")
            return None
        return regions

    def accept(self, run: pb.SlabRun, regions: Sequence[memoryview],
               digests: Sequence[int] | None = None) -> None:
        """The payload of ``run`` has landed in ``regions``: verify and account it.
        ``digests``: the regions' xxh3-64, where the copying thread already took them."""
        kind, i, a = Kind(run.kind), run.entry_index, run.layer_start
        self.bytes_received += sum(len(r) for r in regions)
        for j, region in enumerate(regions):
            digest = digests[j] if digests is not None else xxhash.xxh3_64_intdigest(region)
            if len(run.checksums) != len(regions) or digest != run.checksums[j]:
                self.missing.append(Missing(i, kind, a + j, 1, "checksum mismatch"))
            else:
                self._todo[(i, kind)].discard(a + j)
            self._account(a + j)

    def miss(self, run: pb.SlabRun, reason: str = "") -> None:
        kind, i, a, n = Kind(run.kind), run.entry_index, run.layer_start, run.num_layers
        self.missing.append(Missing(i, kind, a, n, reason or run.missing_reason))
        for layer in range(max(a, self.start), min(a + n, self.end)):
            self._account(layer)

    def feed(self, message: tuple[pb.SlabRun, memoryview]) -> None:
        """Take one decoded gRPC run (header, payload view)."""
        run, data = message
        if run.missing:
            self.miss(run)
            return
        regions = self.fit(run, len(data))
        if regions is None:
            return
        pos = 0
        for region in regions:
            region[:] = data[pos:pos + len(region)]
            pos += len(region)
        self.accept(run, regions)

    def _account(self, layer: int) -> None:
        self._left[layer] -= 1
        if self._left[layer] == 0:
            self._completed.append(layer)

    def take_completed_layers(self) -> list[int]:
        """Layers whose every requested slab has landed or been reported missing since
        the last call, ascending."""
        done, self._completed = sorted(self._completed), []
        return done

    def result(self) -> Slabs:
        """What has landed so far (side-effect free: callable mid-transfer)."""
        missing = list(self.missing)
        for (i, kind), layers in sorted(self._todo.items()):
            if layers and not any(m.entry_index == i and m.kind == kind for m in self.missing):
                missing.append(Missing(i, kind, min(layers), len(layers), "not received"))
        bad = {i for (i, _k), layers in self._todo.items() if layers}
        valid = next((i for i in range(len(self.tokens)) if i in bad), len(self.tokens))
        return Slabs(self.arrays, self.start, self.end, self.offsets, valid, missing,
                     self.bytes_received)


class SelectionAssembler:
    """The assembler of a request with several selections (``GetSlabsRequest.selections``):
    one :class:`SlabAssembler` per selection, each run handed to the one that holds its
    kind and first layer (selections never overlap, and the node never sends a run across
    two). Transports use it as they use a SlabAssembler; a run no selection holds is
    dropped, as one that does not fit is."""

    def __init__(self, parts: Sequence[SlabAssembler]) -> None:
        self.parts = list(parts)

    def _part(self, run: pb.SlabRun) -> SlabAssembler | None:
        for part in self.parts:
            if run.kind in part.kinds and part.start <= run.layer_start < part.end:
                return part
        return None

    def fit(self, run: pb.SlabRun, size: int) -> list[memoryview] | None:
        part = self._part(run)
        return part.fit(run, size) if part is not None else None

    def accept(self, run: pb.SlabRun, regions: Sequence[memoryview], digests: Sequence[int] | None = None) -> None:
        part = self._part(run)
        assert part is not None   # fit() found it
        part.accept(run, regions, digests)

    def miss(self, run: pb.SlabRun, reason: str = "") -> None:
        part = self._part(run)
        if part is not None:
            part.miss(run, reason)

    def block(self, run: pb.SlabRun) -> np.ndarray:
        part = self._part(run)
        assert part is not None   # fit() found it
        return part.block(run)

    def feed(self, message: tuple[pb.SlabRun, memoryview]) -> None:
        part = self._part(message[0])
        if part is not None:
            part.feed(message)

    @property
    def bytes_received(self) -> int:
        return sum(part.bytes_received for part in self.parts)

    def take_completed_layers(self) -> list[tuple[int, int]]:
        """(selection index, layer) pairs completed since the last call."""
        return [(i, layer) for i, part in enumerate(self.parts) for layer in part.take_completed_layers()]


def _destination(given: Any, shape: tuple[int, ...], dtype: DType, as_torch: bool, kind: Kind) -> Any:
    if given is None:
        if as_torch:
            import torch
            return torch.empty(shape, dtype=dtype.to_torch())
        return np.empty(shape, dtype=NUMPY_DTYPES[dtype])
    if tuple(given.shape) != shape:
        raise ValueError(f"out[{kind.name}] has shape {tuple(given.shape)}, expected {shape}")
    if _dtype_of(given) != dtype.short_name:
        raise ValueError(f"out[{kind.name}] has dtype {_dtype_of(given)}, expected {dtype.short_name}")
    return given


def _as_bytes(arr: Any, shape: tuple[int, ...], itemsize: int) -> np.ndarray:
    """``[layers, tokens, bytes_per_token]`` uint8 view sharing memory with ``arr``."""
    flat = byte_view(arr)
    per_token = itemsize
    for dim in shape[2:]:
        per_token *= dim
    return np.frombuffer(flat, dtype=np.uint8).reshape(shape[0], shape[1], per_token)
