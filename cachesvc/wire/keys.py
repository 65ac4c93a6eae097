"""Identities of cachesvc: family ids, chunk hashes, entry ids, and how they are derived.

Shared by the server and the client SDK (stdlib only, no numpy/grpc). The algorithms are
language-neutral and pinned by test vectors in ``tests/vectors/``; docs/chunk-keys.md
states them in prose. Everything hashed is bytes with explicit little-endian lengths,
never ``repr`` or Python's ``hash()`` (a top source of cross-instance misses in other
caches: it is salted per process).
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NewType

ChunkHash = NewType("ChunkHash", bytes)
"""32-byte SHA-256 link of the prefix hash chain."""
FamilyId = NewType("FamilyId", str)
"""32 lowercase hex chars derived from a :class:`FamilySpec`."""
ModelId = NewType("ModelId", str)
"""User-chosen model name, unique per server."""
EntryId = NewType("EntryId", bytes)
"""16 bytes naming one entry: (tenant, family, chunk hash, producer, position offset)."""

# The empty ids: "no consumer" in a lookup, "any" in a listing filter.
NO_MODEL = ModelId("")
NO_FAMILY = FamilyId("")

CHUNK_HASH_BYTES = 32
ENTRY_ID_BYTES = 16
DEFAULT_CHUNK_SIZE = 256
DEFAULT_TENANT = "default"

_FAMILY_DOMAIN = b"cachesvc-family-v1\x00"
_CHAIN_DOMAIN = b"cachesvc-chain-v1\x00"
_ENTRY_DOMAIN = b"cachesvc-entry-v1\x00"
_SEGMENT_DOMAIN = b"cachesvc-segment-v1\x00"
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9._:/@+\-]{1,128}$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{8,128}$")
_U32 = struct.Struct("<I")


class Kind(enum.IntEnum):
    """What a slab holds; values equal the proto enum ``cachesvc.v1.Kind``."""

    K = 1
    V = 2
    E = 3


class DType(enum.IntEnum):
    """Element type of slabs; values equal the proto enum ``cachesvc.v1.DType``."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    FLOAT8_E4M3FN = 4
    FLOAT8_E5M2 = 5
    INT8 = 6
    UINT8 = 7

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def short_name(self) -> str:
        """numpy / ml_dtypes / torch style name, e.g. ``bfloat16``."""
        return self.name.lower()

    def to_torch(self):
        """The torch dtype (the one mapping; torch is imported here, by whoever asks)."""
        import torch
        return getattr(torch, self.short_name)

    @classmethod
    def parse(cls, name: str) -> "DType":
        """Accept ``bfloat16``, ``BFLOAT16``, ``torch.bfloat16``; raise ValueError otherwise."""
        key = name.rsplit(".", 1)[-1].upper()
        aliases = {"FLOAT": "FLOAT32", "HALF": "FLOAT16", "FP32": "FLOAT32", "FP16": "FLOAT16",
                   "BF16": "BFLOAT16", "FLOAT8_E4M3": "FLOAT8_E4M3FN"}
        key = aliases.get(key, key)
        if key not in cls.__members__:
            raise ValueError(f"unknown dtype {name!r}; expected one of "
                             f"{', '.join(m.lower() for m in cls.__members__)}")
        return cls[key]


class Tier(enum.IntEnum):
    """Where an entry lives; values equal the proto enum ``cachesvc.v1.Tier``."""

    MEMORY = 1
    DISK = 2


_ITEMSIZE = {DType.FLOAT32: 4, DType.FLOAT16: 2, DType.BFLOAT16: 2, DType.FLOAT8_E4M3FN: 1,
             DType.FLOAT8_E5M2: 1, DType.INT8: 1, DType.UINT8: 1}


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """The family fingerprint: two models share cache entries only if all fields are equal.

    ``rope_scaling_json`` is the canonical JSON (sorted keys, no spaces) of the model's
    ``rope_scaling``, or "" when it has none; :func:`canonical_json` makes it.
    """

    architecture: str       # e.g. "LlamaForCausalLM"
    num_layers: int         # decoder layers, > 0
    num_kv_heads: int       # > 0
    head_dim: int           # > 0
    hidden_size: int        # > 0
    rope_theta: float       # RoPE base frequency
    rope_scaling_json: str  # canonical JSON or ""
    tokenizer_fingerprint: str  # e.g. sha256 hex of vocab + merges + special tokens
    dtype: DType            # dtype of every slab of the family

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.architecture:
            raise ValueError("family.architecture is empty")
        for name in ("num_layers", "num_kv_heads", "head_dim", "hidden_size"):
            value = getattr(self, name)
            if not 0 < value < 1 << 20:
                raise ValueError(f"family.{name} must be in 1..{(1 << 20) - 1}, got {value}")
        if not self.rope_theta > 0:
            raise ValueError(f"family.rope_theta must be > 0, got {self.rope_theta}")
        if not self.tokenizer_fingerprint:
            raise ValueError("family.tokenizer_fingerprint is empty")
        if self.rope_scaling_json and canonical_json(json.loads(self.rope_scaling_json)) != \
                self.rope_scaling_json:
            raise ValueError("family.rope_scaling_json is not canonical JSON "
                             "(sorted keys, no spaces); build it with canonical_json()")

    def family_id(self) -> FamilyId:
        return family_id(self)

    def slab_shape(self, kind: Kind, num_tokens: int) -> tuple[int, ...]:
        """Token-major slab shape: K/V ``[tokens, kv_heads, head_dim]``, E ``[tokens, hidden]``."""
        if kind == Kind.E:
            return (num_tokens, self.hidden_size)
        return (num_tokens, self.num_kv_heads, self.head_dim)

    def slab_bytes(self, kind: Kind, num_tokens: int) -> int:
        size = self.dtype.itemsize
        for dim in self.slab_shape(kind, num_tokens):
            size *= dim
        return size


def canonical_json(value: object) -> str:
    """Sorted keys, no whitespace, ASCII: the same bytes in any language."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def family_id(spec: FamilySpec) -> FamilyId:
    """``sha256(domain || canonical JSON of the fingerprint)[:16]`` as 32 hex chars.

    The float ``rope_theta`` enters as the hex of its IEEE-754 little-endian double bits,
    so no language has to agree on float formatting.
    """
    doc = {
        "architecture": spec.architecture,
        "dtype": spec.dtype.short_name,
        "head_dim": spec.head_dim,
        "hidden_size": spec.hidden_size,
        "num_kv_heads": spec.num_kv_heads,
        "num_layers": spec.num_layers,
        "rope_scaling": spec.rope_scaling_json,
        "rope_theta_f64le": struct.pack("<d", float(spec.rope_theta)).hex(),
        "tokenizer": spec.tokenizer_fingerprint,
    }
    digest = hashlib.sha256(_FAMILY_DOMAIN + canonical_json(doc).encode("ascii")).digest()
    return FamilyId(digest[:16].hex())


def _lp(data: bytes) -> bytes:
    """Length-prefixed bytes (u32 little-endian length)."""
    return _U32.pack(len(data)) + data


def chain_root(tenant: str, family: FamilyId, chunk_size: int) -> bytes:
    """The chain's h_0: namespaces every hash by tenant, family and chunk size."""
    return hashlib.sha256(_CHAIN_DOMAIN + _lp(tenant.encode("utf-8")) +
                          _lp(family.encode("ascii")) + _U32.pack(chunk_size)).digest()


def encode_extra_keys(extra_keys: Sequence[str | bytes]) -> bytes:
    """Canonical bytes for per-chunk extra keys (LoRA name, cache salt, image hashes...)."""
    parts = [k.encode("utf-8") if isinstance(k, str) else bytes(k) for k in extra_keys]
    return b"".join(_lp(p) for p in parts)


def next_chunk_hash(parent: bytes, tokens: Sequence[int], extras: bytes = b"") -> ChunkHash:
    """``h_i = sha256(h_{i-1} || u32 n || n × u32 token || u32 len(extras) || extras)``."""
    n = len(tokens)
    try:
        packed = struct.pack(f"<{n}I", *tokens)
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in 0..2**32-1: {exc}") from None
    return ChunkHash(hashlib.sha256(parent + _U32.pack(n) + packed + _lp(extras)).digest())


def chunk_hashes(tokens: Sequence[int], family: FamilyId, *, tenant: str = DEFAULT_TENANT,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, extra_keys: Sequence[str | bytes] = (),
                 include_partial: bool = False) -> list[ChunkHash]:
    """Hash chain over the full chunks of ``tokens``.

    A trailing partial chunk (fewer than ``chunk_size`` tokens) is left out by default:
    its hash would only ever match a prompt with exactly the same tail, and consumers
    prefill a few hundred tokens faster than they fetch them. ``include_partial=True``
    hashes it too; its token count is part of the hash, so it can never collide with a
    full chunk.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    extras = encode_extra_keys(extra_keys)
    parent = chain_root(tenant or DEFAULT_TENANT, family, chunk_size)
    out: list[ChunkHash] = []
    end = len(tokens) if include_partial else len(tokens) - len(tokens) % chunk_size
    for start in range(0, end, chunk_size):
        parent = next_chunk_hash(parent, tokens[start:start + chunk_size], extras)
        out.append(parent)
    return out


def parent_of(hashes: Sequence[bytes], index: int, tenant: str, family: FamilyId, chunk_size: int) -> bytes:
    """The chain hash before chunk ``index`` of a chain ``hashes``: ``hashes[index - 1]``,
    or the chain's root for chunk 0 (what a partial chunk is put with, and offered after)."""
    return bytes(hashes[index - 1]) if index else chain_root(tenant or DEFAULT_TENANT, family, chunk_size)


def tail_hashes(parent: bytes, tokens: Sequence[int], extras: bytes = b"") -> list[ChunkHash]:
    """The hash of every non-empty prefix of ``tokens`` as a partial chunk after ``parent``
    (the chain hash before it, or :func:`chain_root`), longest first: the candidates a
    lookup sends to find the longest stored partial chunk a prompt's next chunk starts
    with. ``tail_hashes(h, t)[i] == next_chunk_hash(h, t[:len(t) - i])``; ``tokens`` holds
    fewer than a chunk of them."""
    n = len(tokens)
    try:
        packed = struct.pack(f"<{n}I", *tokens)
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in 0..2**32-1: {exc}") from None
    tail = _lp(extras)
    return [ChunkHash(hashlib.sha256(parent + _U32.pack(size) + packed[:4 * size] + tail).digest())
            for size in range(n, 0, -1)]


def segment_key(tokens: Sequence[int], family: FamilyId, *, tenant: str = DEFAULT_TENANT,
                extra_keys: Sequence[str | bytes] = ()) -> bytes:
    """The content key of a segment (cross-context reuse): its tokens, family, tenant and
    extra keys, wherever it sits in a prompt. 32 bytes, like a chunk hash, but in its own
    domain, so it never equals one."""
    try:
        packed = struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in 0..2**32-1: {exc}") from None
    return hashlib.sha256(_SEGMENT_DOMAIN + _lp((tenant or DEFAULT_TENANT).encode("utf-8")) +
                          _lp(family.encode("ascii")) + _lp(packed) +
                          _lp(encode_extra_keys(extra_keys))).digest()


def entry_id(tenant: str, family: FamilyId, chunk_hash: bytes, producer: str,
             position_offset: int) -> EntryId:
    """Deterministic, so writing the same entry twice names the same entry."""
    data = (_ENTRY_DOMAIN + _lp(tenant.encode("utf-8")) + _lp(family.encode("ascii")) +
            _lp(bytes(chunk_hash)) + _lp(producer.encode("utf-8")) +
            struct.pack("<q", position_offset))
    return EntryId(hashlib.sha256(data).digest()[:ENTRY_ID_BYTES])


def check_model_id(model_id: str) -> None:
    if not _MODEL_ID_RE.match(model_id or ""):
        raise ValueError(f"model_id {model_id!r} must be 1..128 chars of [A-Za-z0-9._:/@+-]")


def check_digest(digest: str) -> None:
    if not _HEX_RE.match(digest or ""):
        raise ValueError(f"weights_digest {digest!r} must be 8..128 hex chars")


def check_chunk_hashes(hashes: Iterable[bytes], what: str = "chunk_hashes") -> None:
    for i, h in enumerate(hashes):
        if len(h) != CHUNK_HASH_BYTES:
            raise ValueError(f"{what}[{i}] has {len(h)} bytes, expected {CHUNK_HASH_BYTES}")
