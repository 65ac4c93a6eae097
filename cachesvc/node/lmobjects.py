"""LMCache objects as cachesvc entries: what the ``lm://`` endpoint stores, under which
family, producer and chunk hash, and how a stored entry turns back into the object.

An LMCache object is a tensor of a known memory format with a key string
(``model@world_size@worker_id@hash@dtype[@tag%value...]``). It becomes one entry:

- **family**: per (model name, format, dtype, layers, hidden): the tokenizer fingerprint
  is ``lmcache:<model name>``, so two models never share an entry, and no LMCache family
  equals a family of our own connectors;
- **producer**: ``lm:<model name, made safe>/<family id prefix>``, registered on first use
  (and so kept in models.json across restarts);
- **chunk hash**: sha256 of the whole key string (world size, worker, dtype and tags
  included), position offset 0.

KV formats whose layout is ours — ``KV_2LTD`` [2, L, T, D], ``KV_2TD`` [2, T, D],
``KV_MLA_FMT`` [1, L, T, D] with T ≤ the node's chunk size — become real K (and V) slabs
of L layers of T tokens: the entry's payload (kind-major, layers ascending, token-major
slabs) *is* the object's bytes, so a PUT is received straight into the memory tier and a
GET sends it straight out. Any other object is stored opaque: one K slab whose shape
only carries the byte count, the object's exact shape kept in the family.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from cachesvc.node.entries import EntryMeta, SlabSpec
from cachesvc.node.records import EntryInput
from cachesvc.node.store import CacheStore
from cachesvc.wire.errors import InvalidArgument
from cachesvc.wire.keys import DEFAULT_TENANT, DType, FamilySpec, Kind, entry_id
from cachesvc.wire.lmwire import CODE_OF_DTYPE, DTYPE_OF_CODE, Format, LmProtocolError, model_of_key

log = logging.getLogger(__name__)

_ARCH = "lmcache"
_FINGERPRINT = "lmcache:"
_KV_FORMATS = {Format.KV_2LTD: (2, 4), Format.KV_2TD: (2, 3), Format.KV_MLA_FMT: (1, 4)}   # (kinds, rank)
_OPAQUE_ROW = 1 << 16   # an opaque slab is [1, rows, cols] with cols dividing this
_UNSAFE = re.compile(r"[^A-Za-z0-9._:+-]")


@dataclass(frozen=True, slots=True)
class ObjectShape:
    """What an LMCache header says of an object."""

    fmt: int
    dtype_code: int
    shape: tuple[int, int, int, int]   # padded with zeros
    length: int                        # payload bytes


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an object goes: its family, producer and the one entry's slabs."""

    family: FamilySpec
    family_id: str
    producer: str
    num_tokens: int
    slabs: tuple[SlabSpec, ...]        # checksums 0: the node seals them at commit


def place(model_name: str, obj: ObjectShape, chunk_size: int, max_bytes: int) -> Placement:
    """The entry an object becomes; InvalidArgument for one we cannot store (the
    endpoint then closes the connection: the header was not one LMCache would send)."""
    dtype = DTYPE_OF_CODE.get(obj.dtype_code)
    if dtype is None:
        raise InvalidArgument(f"dtype code {obj.dtype_code} is not stored here (codes: "
                              f"{sorted(DTYPE_OF_CODE)})")
    if not 0 < obj.length <= max_bytes:
        raise InvalidArgument(f"object of {obj.length} bytes; this endpoint takes 1..{max_bytes}")
    if any(d < 0 for d in obj.shape):
        raise InvalidArgument(f"negative dimension in shape {list(obj.shape)}")
    binary = obj.fmt in (Format.BINARY, Format.BINARY_BUFFER)
    dims = [d for d in obj.shape if d]
    if not binary and (not dims or obj.length != math.prod(dims) * dtype.itemsize or
                       dims != list(obj.shape[:len(dims)])):
        raise InvalidArgument(f"length {obj.length} does not match shape {list(obj.shape)} of "
                              f"{dtype.short_name}")
    if obj.length % dtype.itemsize:
        raise InvalidArgument(f"length {obj.length} is not a whole number of {dtype.short_name}")
    kv = _KV_FORMATS.get(obj.fmt)   # type: ignore[call-overload]
    if kv is not None and len(dims) == kv[1] and dims[0] == kv[0]:
        kinds, rank = kv
        layers, tokens, hidden = (1, dims[1], dims[2]) if rank == 3 else (dims[1], dims[2], dims[3])
        if tokens <= chunk_size and max(layers, hidden) < 1 << 20:
            family = _family(model_name, f"{_ARCH}:fmt{obj.fmt}", layers, 1, hidden, dtype)
            slabs = tuple(SlabSpec(kind, layer, (tokens, 1, hidden), dtype, 0)
                          for kind in (Kind.K, Kind.V)[:kinds] for layer in range(layers))
            return _placement(model_name, family, tokens, slabs)
    elements = obj.length // dtype.itemsize
    cols = math.gcd(elements, _OPAQUE_ROW)
    rows = elements // cols
    if rows >= 1 << 20:
        raise InvalidArgument(f"object of {obj.length} bytes is too large to store opaque")
    shape = "x".join(map(str, obj.shape))
    family = _family(model_name, f"{_ARCH}:fmt{obj.fmt}:shape{shape}", 1, rows, cols, dtype)
    return _placement(model_name, family, 1, (SlabSpec(Kind.K, 0, (1, rows, cols), dtype, 0),))


def object_shape(family: FamilySpec, meta: EntryMeta) -> ObjectShape:
    """The LMCache header of a stored entry (the inverse of :func:`place`)."""
    parts = family.architecture.split(":")
    fmt = int(parts[1][3:])
    code = CODE_OF_DTYPE[family.dtype]
    if len(parts) == 3:   # opaque: the shape was kept as sent
        shape = tuple(int(d) for d in parts[2][5:].split("x"))
        return ObjectShape(fmt, code, shape, meta.size_bytes)   # type: ignore[arg-type]
    kinds, rank = _KV_FORMATS[Format(fmt)]
    t, d = meta.num_tokens, family.head_dim
    dims = (kinds, t, d, 0) if rank == 3 else (kinds, family.num_layers, t, d)
    return ObjectShape(fmt, code, dims, meta.size_bytes)


def is_lmcache_family(family: FamilySpec) -> bool:
    return family.tokenizer_fingerprint.startswith(_FINGERPRINT) and family.architecture.startswith(_ARCH + ":")


def chunk_hash_of(key: str) -> bytes:
    return hashlib.sha256(b"lmcache-key\0" + key.encode("utf-8")).digest()


def _family(model_name: str, architecture: str, layers: int, heads: int, hidden: int,
            dtype: DType) -> FamilySpec:
    return FamilySpec(architecture, layers, heads, hidden, hidden, 1.0, "",
                      _FINGERPRINT + model_name, dtype)


def _placement(model_name: str, family: FamilySpec, tokens: int, slabs: tuple[SlabSpec, ...]) -> Placement:
    fid = family.family_id()
    safe = _UNSAFE.sub("_", model_name)[:96]
    return Placement(family, fid, f"lm:{safe}/{fid[:16]}", tokens, slabs)


@dataclass(frozen=True, slots=True)
class Stored:
    """A key's entry and the object header it answers with."""

    family_id: str
    meta: EntryMeta
    shape: ObjectShape


class LmObjects:
    """LMCache keys over a store, for one tenant. Thread-safe.

    Keys are kept (for LIST) in ``keys_path``, one per line, appended when first stored;
    LIST answers those whose entries are still present (evicted and deleted ones drop
    out), and the file is rewritten with only those at start.
    """

    def __init__(self, store: CacheStore, tenant: str, keys_path: Path | None, max_bytes: int) -> None:
        self.store, self.tenant, self.max_bytes = store, tenant or DEFAULT_TENANT, max_bytes
        self._lock = threading.Lock()
        # model name -> family id -> (family, its producer), for every registered LMCache family
        self._families: dict[str, dict[str, tuple[FamilySpec, str]]] = {}
        for record in store.list_models(self.tenant):
            if is_lmcache_family(record.family):
                model = record.family.tokenizer_fingerprint[len(_FINGERPRINT):]
                self._families.setdefault(model, {})[record.family_id] = (record.family, record.model_id)
        self._keys_path = keys_path
        self._keys: dict[str, None] = {}   # insertion-ordered set
        if keys_path is not None and keys_path.exists():
            for line in keys_path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    if line and self.find(line) is not None:
                        self._keys[line] = None
                except LmProtocolError:
                    continue   # not a key (a torn last line): dropped by the rewrite
            self._rewrite_keys()

    def placement(self, model_name: str, obj: ObjectShape) -> Placement:
        """Where ``obj`` goes, its producer registered (InvalidArgument if unstorable)."""
        placement = place(model_name, obj, self.store.config.chunk_size, self.max_bytes)
        with self._lock:
            known = placement.family_id in self._families.get(model_name, {})
        if not known:
            digest = hashlib.sha256((_FINGERPRINT + model_name).encode()).hexdigest()[:32]
            self.store.register_model(placement.producer, digest, placement.family, replace=False,
                                      tenant=self.tenant)
            with self._lock:
                self._families.setdefault(model_name, {})[placement.family_id] = (placement.family,
                                                                                   placement.producer)
        return placement

    def entry_input(self, key: str, placement: Placement) -> EntryInput:
        return EntryInput(chunk_hash_of(key), 0, placement.num_tokens, list(placement.slabs))

    def find(self, key: str) -> Stored | None:
        """The committed entry of ``key``, if any, in any of its model's families;
        LmProtocolError for a key that is not LMCache's."""
        with self._lock:
            candidates = list(self._families.get(model_of_key(key), {}).items())
        chash = chunk_hash_of(key)
        for family_id, (family, producer) in candidates:
            eid = entry_id(self.tenant, family_id, chash, producer, 0)   # type: ignore[arg-type]
            meta = self.store.entries_of(self.tenant, family_id, [eid])[0]
            if meta is not None:
                return Stored(family_id, meta, object_shape(family, meta))
        return None

    def stored(self, key: str) -> None:
        """Remember a newly committed key (for LIST)."""
        with self._lock:
            if key in self._keys:
                return
            self._keys[key] = None
            if self._keys_path is not None:
                with self._keys_path.open("a", encoding="utf-8") as fh:
                    fh.write(key + "\n")

    def keys(self) -> list[str]:
        with self._lock:
            known = list(self._keys)
        return [k for k in known if self.find(k) is not None]

    def _rewrite_keys(self) -> None:
        assert self._keys_path is not None
        tmp = self._keys_path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in self._keys), encoding="utf-8")
        tmp.replace(self._keys_path)
