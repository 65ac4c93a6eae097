from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3FN: _ClassVar[DType]
    DTYPE_FLOAT8_E5M2: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    KIND_K: _ClassVar[Kind]
    KIND_V: _ClassVar[Kind]
    KIND_E: _ClassVar[Kind]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_MEMORY: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT8_E4M3FN: DType
DTYPE_FLOAT8_E5M2: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
KIND_UNSPECIFIED: Kind
KIND_K: Kind
KIND_V: Kind
KIND_E: Kind
TIER_UNSPECIFIED: Tier
TIER_MEMORY: Tier
TIER_DISK: Tier

class RopeSpec(_message.Message):
    __slots__ = ("theta", "scaling_json")
    THETA_FIELD_NUMBER: _ClassVar[int]
    SCALING_JSON_FIELD_NUMBER: _ClassVar[int]
    theta: float
    scaling_json: str
    def __init__(self, theta: _Optional[float] = ..., scaling_json: _Optional[str] = ...) -> None: ...

class FamilySpec(_message.Message):
    __slots__ = ("architecture", "num_layers", "num_kv_heads", "head_dim", "hidden_size", "rope", "tokenizer_fingerprint", "dtype")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROPE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rope: RopeSpec
    tokenizer_fingerprint: str
    dtype: DType
    def __init__(self, architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., hidden_size: _Optional[int] = ..., rope: _Optional[_Union[RopeSpec, _Mapping]] = ..., tokenizer_fingerprint: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("model_id", "weights_digest", "family")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    weights_digest: str
    family: FamilySpec
    def __init__(self, model_id: _Optional[str] = ..., weights_digest: _Optional[str] = ..., family: _Optional[_Union[FamilySpec, _Mapping]] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("model", "replace", "tenant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    replace: bool
    tenant: str
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., replace: _Optional[bool] = ..., tenant: _Optional[str] = ...) -> None: ...

class RegisterModelResponse(_message.Message):
    __slots__ = ("family_id", "created", "chunk_size")
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    family_id: str
    created: bool
    chunk_size: int
    def __init__(self, family_id: _Optional[str] = ..., created: _Optional[bool] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id", "tenant")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tenant: str
    def __init__(self, model_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model", "family_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    family_id: str
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., family_id: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[GetModelResponse]
    def __init__(self, models: _Optional[_Iterable[_Union[GetModelResponse, _Mapping]]] = ...) -> None: ...

class SlabSpec(_message.Message):
    __slots__ = ("kind", "layer", "shape", "dtype", "checksum")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    kind: Kind
    layer: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    checksum: int
    def __init__(self, kind: _Optional[_Union[Kind, str]] = ..., layer: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., checksum: _Optional[int] = ...) -> None: ...

class EntrySpec(_message.Message):
    __slots__ = ("chunk_hash", "position_offset", "num_tokens", "slabs", "parent_hash")
    CHUNK_HASH_FIELD_NUMBER: _ClassVar[int]
    POSITION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLABS_FIELD_NUMBER: _ClassVar[int]
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    chunk_hash: bytes
    position_offset: int
    num_tokens: int
    slabs: _containers.RepeatedCompositeFieldContainer[SlabSpec]
    parent_hash: bytes
    def __init__(self, chunk_hash: _Optional[bytes] = ..., position_offset: _Optional[int] = ..., num_tokens: _Optional[int] = ..., slabs: _Optional[_Iterable[_Union[SlabSpec, _Mapping]]] = ..., parent_hash: _Optional[bytes] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "producer", "entries", "ttl_s", "producer_digest")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    producer: str
    entries: _containers.RepeatedCompositeFieldContainer[EntrySpec]
    ttl_s: int
    producer_digest: str
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., producer: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[EntrySpec, _Mapping]]] = ..., ttl_s: _Optional[int] = ..., producer_digest: _Optional[str] = ...) -> None: ...

class EntryWriteTarget(_message.Message):
    __slots__ = ("entry_index", "size_bytes", "slab_offsets", "already_present")
    ENTRY_INDEX_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLAB_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    entry_index: int
    size_bytes: int
    slab_offsets: _containers.RepeatedScalarFieldContainer[int]
    already_present: bool
    def __init__(self, entry_index: _Optional[int] = ..., size_bytes: _Optional[int] = ..., slab_offsets: _Optional[_Iterable[int]] = ..., already_present: _Optional[bool] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation_id", "targets", "expires_in_ms")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    targets: _containers.RepeatedCompositeFieldContainer[EntryWriteTarget]
    expires_in_ms: int
    def __init__(self, reservation_id: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[EntryWriteTarget, _Mapping]]] = ..., expires_in_ms: _Optional[int] = ...) -> None: ...

class WriteChunk(_message.Message):
    __slots__ = ("reservation_id", "entry_index", "offset", "data")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    entry_index: int
    offset: int
    data: bytes
    def __init__(self, reservation_id: _Optional[str] = ..., entry_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteSlabsResponse(_message.Message):
    __slots__ = ("bytes_received",)
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    def __init__(self, bytes_received: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("entries_committed",)
    ENTRIES_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    entries_committed: int
    def __init__(self, entries_committed: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "chunk_hashes", "consumer", "producers", "lease_ttl_s", "tail_hashes", "offer_tails", "locate", "cluster")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_HASHES_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    PRODUCERS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    TAIL_HASHES_FIELD_NUMBER: _ClassVar[int]
    OFFER_TAILS_FIELD_NUMBER: _ClassVar[int]
    LOCATE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    chunk_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    consumer: str
    producers: _containers.RepeatedScalarFieldContainer[str]
    lease_ttl_s: int
    tail_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    offer_tails: bool
    locate: bool
    cluster: bool
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., chunk_hashes: _Optional[_Iterable[bytes]] = ..., consumer: _Optional[str] = ..., producers: _Optional[_Iterable[str]] = ..., lease_ttl_s: _Optional[int] = ..., tail_hashes: _Optional[_Iterable[bytes]] = ..., offer_tails: _Optional[bool] = ..., locate: _Optional[bool] = ..., cluster: _Optional[bool] = ...) -> None: ...

class EntryLayout(_message.Message):
    __slots__ = ("num_tokens", "k_layers", "v_layers", "e_layers")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    K_LAYERS_FIELD_NUMBER: _ClassVar[int]
    V_LAYERS_FIELD_NUMBER: _ClassVar[int]
    E_LAYERS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    k_layers: _containers.RepeatedScalarFieldContainer[int]
    v_layers: _containers.RepeatedScalarFieldContainer[int]
    e_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_tokens: _Optional[int] = ..., k_layers: _Optional[_Iterable[int]] = ..., v_layers: _Optional[_Iterable[int]] = ..., e_layers: _Optional[_Iterable[int]] = ...) -> None: ...

class LookupHit(_message.Message):
    __slots__ = ("producer", "same_model", "num_chunks", "entry_ids", "position_offsets", "layout_indices", "tiers", "fetch", "tail_chunk_hashes", "tail_entry_ids", "tail_position_offsets", "tail_layout_indices", "tail_tiers", "arena_offsets", "slab_checksums", "tail_arena_offsets", "tail_slab_checksums", "owner_counts", "owner_nodes", "tail_owner_counts", "tail_owner_nodes")
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    SAME_MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITION_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_INDICES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    TAIL_CHUNK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TAIL_ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    TAIL_POSITION_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LAYOUT_INDICES_FIELD_NUMBER: _ClassVar[int]
    TAIL_TIERS_FIELD_NUMBER: _ClassVar[int]
    ARENA_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SLAB_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    TAIL_ARENA_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    TAIL_SLAB_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    OWNER_COUNTS_FIELD_NUMBER: _ClassVar[int]
    OWNER_NODES_FIELD_NUMBER: _ClassVar[int]
    TAIL_OWNER_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TAIL_OWNER_NODES_FIELD_NUMBER: _ClassVar[int]
    producer: str
    same_model: bool
    num_chunks: int
    entry_ids: bytes
    position_offsets: _containers.RepeatedScalarFieldContainer[int]
    layout_indices: _containers.RepeatedScalarFieldContainer[int]
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    fetch: FetchDescriptor
    tail_chunk_hashes: bytes
    tail_entry_ids: bytes
    tail_position_offsets: _containers.RepeatedScalarFieldContainer[int]
    tail_layout_indices: _containers.RepeatedScalarFieldContainer[int]
    tail_tiers: _containers.RepeatedScalarFieldContainer[Tier]
    arena_offsets: _containers.RepeatedScalarFieldContainer[int]
    slab_checksums: bytes
    tail_arena_offsets: _containers.RepeatedScalarFieldContainer[int]
    tail_slab_checksums: bytes
    owner_counts: _containers.RepeatedScalarFieldContainer[int]
    owner_nodes: _containers.RepeatedScalarFieldContainer[int]
    tail_owner_counts: _containers.RepeatedScalarFieldContainer[int]
    tail_owner_nodes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, producer: _Optional[str] = ..., same_model: _Optional[bool] = ..., num_chunks: _Optional[int] = ..., entry_ids: _Optional[bytes] = ..., position_offsets: _Optional[_Iterable[int]] = ..., layout_indices: _Optional[_Iterable[int]] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., fetch: _Optional[_Union[FetchDescriptor, _Mapping]] = ..., tail_chunk_hashes: _Optional[bytes] = ..., tail_entry_ids: _Optional[bytes] = ..., tail_position_offsets: _Optional[_Iterable[int]] = ..., tail_layout_indices: _Optional[_Iterable[int]] = ..., tail_tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., arena_offsets: _Optional[_Iterable[int]] = ..., slab_checksums: _Optional[bytes] = ..., tail_arena_offsets: _Optional[_Iterable[int]] = ..., tail_slab_checksums: _Optional[bytes] = ..., owner_counts: _Optional[_Iterable[int]] = ..., owner_nodes: _Optional[_Iterable[int]] = ..., tail_owner_counts: _Optional[_Iterable[int]] = ..., tail_owner_nodes: _Optional[_Iterable[int]] = ...) -> None: ...

class FetchDescriptor(_message.Message):
    __slots__ = ("node_id", "grpc_address", "transports", "host_id")
    class TransportsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    grpc_address: str
    transports: _containers.ScalarMap[str, bytes]
    host_id: str
    def __init__(self, node_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., transports: _Optional[_Mapping[str, bytes]] = ..., host_id: _Optional[str] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hits", "layouts", "lease_id", "nodes")
    HITS_FIELD_NUMBER: _ClassVar[int]
    LAYOUTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[LookupHit]
    layouts: _containers.RepeatedCompositeFieldContainer[EntryLayout]
    lease_id: str
    nodes: _containers.RepeatedCompositeFieldContainer[FetchDescriptor]
    def __init__(self, hits: _Optional[_Iterable[_Union[LookupHit, _Mapping]]] = ..., layouts: _Optional[_Iterable[_Union[EntryLayout, _Mapping]]] = ..., lease_id: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[FetchDescriptor, _Mapping]]] = ...) -> None: ...

class GetSlabsRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "entry_ids", "kinds", "layer_start", "layer_end", "layer_major", "selections")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    LAYER_MAJOR_FIELD_NUMBER: _ClassVar[int]
    SELECTIONS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    entry_ids: _containers.RepeatedScalarFieldContainer[bytes]
    kinds: _containers.RepeatedScalarFieldContainer[Kind]
    layer_start: int
    layer_end: int
    layer_major: bool
    selections: _containers.RepeatedCompositeFieldContainer[SlabSelection]
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., entry_ids: _Optional[_Iterable[bytes]] = ..., kinds: _Optional[_Iterable[_Union[Kind, str]]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., layer_major: _Optional[bool] = ..., selections: _Optional[_Iterable[_Union[SlabSelection, _Mapping]]] = ...) -> None: ...

class SlabSelection(_message.Message):
    __slots__ = ("kinds", "layer_start", "layer_end")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[Kind]
    layer_start: int
    layer_end: int
    def __init__(self, kinds: _Optional[_Iterable[_Union[Kind, str]]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class SlabRun(_message.Message):
    __slots__ = ("entry_index", "kind", "layer_start", "num_layers", "checksums", "data", "missing", "missing_reason")
    ENTRY_INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    MISSING_REASON_FIELD_NUMBER: _ClassVar[int]
    entry_index: int
    kind: Kind
    layer_start: int
    num_layers: int
    checksums: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    missing: bool
    missing_reason: str
    def __init__(self, entry_index: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., layer_start: _Optional[int] = ..., num_layers: _Optional[int] = ..., checksums: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., missing: _Optional[bool] = ..., missing_reason: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "entry_ids", "chunk_hashes", "producer")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_HASHES_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    entry_ids: _containers.RepeatedScalarFieldContainer[bytes]
    chunk_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    producer: str
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., entry_ids: _Optional[_Iterable[bytes]] = ..., chunk_hashes: _Optional[_Iterable[bytes]] = ..., producer: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("entries_deleted",)
    ENTRIES_DELETED_FIELD_NUMBER: _ClassVar[int]
    entries_deleted: int
    def __init__(self, entries_deleted: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "entry_ids", "ttl_s")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    entry_ids: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_s: int
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., entry_ids: _Optional[_Iterable[bytes]] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("lease_id", "entries_pinned")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_PINNED_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    entries_pinned: int
    def __init__(self, lease_id: _Optional[str] = ..., entries_pinned: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "producer", "limit", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    producer: str
    limit: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., producer: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class EntryInfo(_message.Message):
    __slots__ = ("entry_id", "tenant", "family_id", "chunk_hash", "producer", "position_offset", "layout", "size_bytes", "tier", "pinned")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_HASH_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    POSITION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    entry_id: bytes
    tenant: str
    family_id: str
    chunk_hash: bytes
    producer: str
    position_offset: int
    layout: EntryLayout
    size_bytes: int
    tier: Tier
    pinned: bool
    def __init__(self, entry_id: _Optional[bytes] = ..., tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., chunk_hash: _Optional[bytes] = ..., producer: _Optional[str] = ..., position_offset: _Optional[int] = ..., layout: _Optional[_Union[EntryLayout, _Mapping]] = ..., size_bytes: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ..., pinned: _Optional[bool] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[EntryInfo]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[EntryInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "reserved_bytes", "entries", "evictions")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    capacity_bytes: int
    used_bytes: int
    reserved_bytes: int
    entries: int
    evictions: int
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., entries: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("node_id", "chunk_size", "tiers", "entries", "models", "open_reservations", "counters", "uptime_s", "fetch")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    OPEN_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    chunk_size: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    entries: int
    models: int
    open_reservations: int
    counters: _containers.ScalarMap[str, int]
    uptime_s: int
    fetch: FetchDescriptor
    def __init__(self, node_id: _Optional[str] = ..., chunk_size: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., entries: _Optional[int] = ..., models: _Optional[int] = ..., open_reservations: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ..., uptime_s: _Optional[int] = ..., fetch: _Optional[_Union[FetchDescriptor, _Mapping]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "redis_up", "namespace")
    NODES_FIELD_NUMBER: _ClassVar[int]
    REDIS_UP_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[FetchDescriptor]
    redis_up: bool
    namespace: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[FetchDescriptor, _Mapping]]] = ..., redis_up: _Optional[bool] = ..., namespace: _Optional[str] = ...) -> None: ...

class ProfileSpec(_message.Message):
    __slots__ = ("producer", "consumer", "producer_digest", "consumer_digest", "document")
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    producer: str
    consumer: str
    producer_digest: str
    consumer_digest: str
    document: bytes
    def __init__(self, producer: _Optional[str] = ..., consumer: _Optional[str] = ..., producer_digest: _Optional[str] = ..., consumer_digest: _Optional[str] = ..., document: _Optional[bytes] = ...) -> None: ...

class PutProfileRequest(_message.Message):
    __slots__ = ("profile", "tenant")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    profile: ProfileSpec
    tenant: str
    def __init__(self, profile: _Optional[_Union[ProfileSpec, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class PutProfileResponse(_message.Message):
    __slots__ = ("version", "replaced")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    version: int
    replaced: bool
    def __init__(self, version: _Optional[int] = ..., replaced: _Optional[bool] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("producer", "consumer", "tenant")
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    producer: str
    consumer: str
    tenant: str
    def __init__(self, producer: _Optional[str] = ..., consumer: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class GetProfileResponse(_message.Message):
    __slots__ = ("profile", "version", "flagged")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    profile: ProfileSpec
    version: int
    flagged: str
    def __init__(self, profile: _Optional[_Union[ProfileSpec, _Mapping]] = ..., version: _Optional[int] = ..., flagged: _Optional[str] = ...) -> None: ...

class FlagProfileRequest(_message.Message):
    __slots__ = ("producer", "consumer", "version", "reason", "tenant")
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    producer: str
    consumer: str
    version: int
    reason: str
    tenant: str
    def __init__(self, producer: _Optional[str] = ..., consumer: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class FlagProfileResponse(_message.Message):
    __slots__ = ("applied", "flags")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    flags: int
    def __init__(self, applied: _Optional[bool] = ..., flags: _Optional[int] = ...) -> None: ...

class ListProfilesRequest(_message.Message):
    __slots__ = ("producer", "consumer", "tenant")
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    producer: str
    consumer: str
    tenant: str
    def __init__(self, producer: _Optional[str] = ..., consumer: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class ProfileInfo(_message.Message):
    __slots__ = ("producer", "consumer", "producer_digest", "consumer_digest", "version", "stale", "size_bytes", "flagged", "flags")
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    producer: str
    consumer: str
    producer_digest: str
    consumer_digest: str
    version: int
    stale: bool
    size_bytes: int
    flagged: str
    flags: int
    def __init__(self, producer: _Optional[str] = ..., consumer: _Optional[str] = ..., producer_digest: _Optional[str] = ..., consumer_digest: _Optional[str] = ..., version: _Optional[int] = ..., stale: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., flagged: _Optional[str] = ..., flags: _Optional[int] = ...) -> None: ...

class ListProfilesResponse(_message.Message):
    __slots__ = ("profiles",)
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    profiles: _containers.RepeatedCompositeFieldContainer[ProfileInfo]
    def __init__(self, profiles: _Optional[_Iterable[_Union[ProfileInfo, _Mapping]]] = ...) -> None: ...

class SegmentSource(_message.Message):
    __slots__ = ("producer", "chunk_hashes", "offset", "length", "prefix_tokens", "normalized")
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_HASHES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    producer: str
    chunk_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    offset: int
    length: int
    prefix_tokens: bytes
    normalized: bool
    def __init__(self, producer: _Optional[str] = ..., chunk_hashes: _Optional[_Iterable[bytes]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., prefix_tokens: _Optional[bytes] = ..., normalized: _Optional[bool] = ...) -> None: ...

class PutSegmentRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "segment_key", "source")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    segment_key: bytes
    source: SegmentSource
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., segment_key: _Optional[bytes] = ..., source: _Optional[_Union[SegmentSource, _Mapping]] = ...) -> None: ...

class PutSegmentResponse(_message.Message):
    __slots__ = ("sources",)
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    sources: int
    def __init__(self, sources: _Optional[int] = ...) -> None: ...

class FindSegmentsRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "segment_keys", "max_sources")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    segment_keys: _containers.RepeatedScalarFieldContainer[bytes]
    max_sources: int
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., segment_keys: _Optional[_Iterable[bytes]] = ..., max_sources: _Optional[int] = ...) -> None: ...

class SegmentSources(_message.Message):
    __slots__ = ("segment_key", "sources")
    SEGMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    segment_key: bytes
    sources: _containers.RepeatedCompositeFieldContainer[SegmentSource]
    def __init__(self, segment_key: _Optional[bytes] = ..., sources: _Optional[_Iterable[_Union[SegmentSource, _Mapping]]] = ...) -> None: ...

class FindSegmentsResponse(_message.Message):
    __slots__ = ("segments",)
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[SegmentSources]
    def __init__(self, segments: _Optional[_Iterable[_Union[SegmentSources, _Mapping]]] = ...) -> None: ...

class AnchorDelta(_message.Message):
    __slots__ = ("agent", "producer", "placeholder_hashes", "following_hashes", "following_length", "size_bytes")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_HASHES_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_HASHES_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    agent: str
    producer: str
    placeholder_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    following_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    following_length: int
    size_bytes: int
    def __init__(self, agent: _Optional[str] = ..., producer: _Optional[str] = ..., placeholder_hashes: _Optional[_Iterable[bytes]] = ..., following_hashes: _Optional[_Iterable[bytes]] = ..., following_length: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class AnchorInfo(_message.Message):
    __slots__ = ("segment_key", "length", "base", "deltas", "activations", "admitted_seq", "size_bytes")
    SEGMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_SEQ_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    segment_key: bytes
    length: int
    base: SegmentSource
    deltas: _containers.RepeatedCompositeFieldContainer[AnchorDelta]
    activations: int
    admitted_seq: int
    size_bytes: int
    def __init__(self, segment_key: _Optional[bytes] = ..., length: _Optional[int] = ..., base: _Optional[_Union[SegmentSource, _Mapping]] = ..., deltas: _Optional[_Iterable[_Union[AnchorDelta, _Mapping]]] = ..., activations: _Optional[int] = ..., admitted_seq: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class AdmitAnchorRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "placeholder", "anchor")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    placeholder: str
    anchor: AnchorInfo
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., placeholder: _Optional[str] = ..., anchor: _Optional[_Union[AnchorInfo, _Mapping]] = ...) -> None: ...

class AdmitAnchorResponse(_message.Message):
    __slots__ = ("admitted", "evicted")
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    admitted: bool
    evicted: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, admitted: _Optional[bool] = ..., evicted: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RecordAnchorRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "placeholder", "segment_key", "delta")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    placeholder: str
    segment_key: bytes
    delta: AnchorDelta
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., placeholder: _Optional[str] = ..., segment_key: _Optional[bytes] = ..., delta: _Optional[_Union[AnchorDelta, _Mapping]] = ...) -> None: ...

class RecordAnchorResponse(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, evicted: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FindAnchorsRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "placeholder", "min_length")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_FIELD_NUMBER: _ClassVar[int]
    MIN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    placeholder: str
    min_length: int
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., placeholder: _Optional[str] = ..., min_length: _Optional[int] = ...) -> None: ...

class FindAnchorsResponse(_message.Message):
    __slots__ = ("anchors",)
    ANCHORS_FIELD_NUMBER: _ClassVar[int]
    anchors: _containers.RepeatedCompositeFieldContainer[AnchorInfo]
    def __init__(self, anchors: _Optional[_Iterable[_Union[AnchorInfo, _Mapping]]] = ...) -> None: ...

class ActivateAnchorsRequest(_message.Message):
    __slots__ = ("tenant", "family_id", "placeholder", "segment_keys")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_KEYS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    family_id: str
    placeholder: str
    segment_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, tenant: _Optional[str] = ..., family_id: _Optional[str] = ..., placeholder: _Optional[str] = ..., segment_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ActivateAnchorsResponse(_message.Message):
    __slots__ = ("activated",)
    ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    activated: int
    def __init__(self, activated: _Optional[int] = ...) -> None: ...
