"""The local-disk tier's file format and I/O. Policy (what to spill, what to evict) lives
in the store; this module only writes, scans, reads and removes entry files.

One file per entry, ``<root>/entries/<id[:2]>/<id>.ent``::

    b"CSVCENT1" | u32 header_len | header (canonical JSON) | payload | u64 xxh3(header) | b"CSVCEND1"

Files are written to ``*.tmp`` and renamed, so a crash leaves either a whole file or a
``.tmp`` that the next start deletes. A file cut short or overwritten (a torn write the
rename did not protect, e.g. no fsync before power loss) fails the size, trailer or
header checks on start and is dropped. Payload bytes are verified per slab against
their checksums when read, so a corrupted slab is a miss, never wrong data.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import xxhash

from cachesvc.node.entries import EntryMeta, Slab
from cachesvc.wire.layout import Layout, intern_layout
from cachesvc.wire.keys import ChunkHash, DType, EntryId, FamilyId, Kind, canonical_json, entry_id

log = logging.getLogger(__name__)

_MAGIC = b"CSVCENT1"
_END = b"CSVCEND1"
_HEAD = struct.Struct("<8sI")
_TAIL = struct.Struct("<Q8s")


class TornFile(Exception):
    """An entry file that is incomplete or whose header fails its checksum."""


@dataclass(slots=True)
class ScanResult:
    entries: list[EntryMeta]     # whole files, oldest first (by mtime)
    dropped: list[str]           # paths removed as torn or unreadable


def _header(meta: EntryMeta) -> bytes:
    doc = {
        "tenant": meta.tenant, "family_id": meta.family_id, "chunk_hash": meta.chunk_hash.hex(),
        "producer": meta.producer, "position_offset": meta.position_offset,
        "num_tokens": meta.num_tokens, "size_bytes": meta.size_bytes,
        "slabs": [[int(s.kind), s.layer, list(s.shape), int(s.dtype), s.checksum, s.offset,
                   s.size_bytes] for s in meta.slabs],
    }
    if meta.parent_hash:   # absent from files written before partial chunks had parents
        doc["parent_hash"] = meta.parent_hash.hex()
    return canonical_json(doc).encode("ascii")


def _meta_from_header(raw: bytes) -> EntryMeta:
    doc = json.loads(raw)
    chunk_hash = ChunkHash(bytes.fromhex(doc["chunk_hash"]))
    entry = entry_id(doc["tenant"], FamilyId(doc["family_id"]), chunk_hash, doc["producer"],
                     doc["position_offset"])
    slabs = tuple(Slab(Kind(k), layer, tuple(shape), DType(dt), checksum, off, size)
                  for k, layer, shape, dt, checksum, off, size in doc["slabs"])
    layout = intern_layout(Layout(doc["num_tokens"], *(
        tuple(s.layer for s in slabs if s.kind == kind) for kind in (Kind.K, Kind.V, Kind.E))))
    return EntryMeta(entry, doc["tenant"], FamilyId(doc["family_id"]), chunk_hash, doc["producer"],
                     doc["position_offset"], doc["num_tokens"], slabs, doc["size_bytes"], layout,
                     bytes.fromhex(doc.get("parent_hash", "")))


class DiskTier:
    """Entry files under ``root``. Thread-safe: every call works on its own file handle."""

    def __init__(self, root: Path, fsync: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        (self.root / "entries").mkdir(parents=True, exist_ok=True)

    def path(self, entry: EntryId) -> Path:
        name = entry.hex()
        return self.root / "entries" / name[:2] / f"{name}.ent"

    def file_bytes(self, meta: EntryMeta) -> int:
        """Bytes the entry takes on disk (what counts against the disk capacity)."""
        return _HEAD.size + len(_header(meta)) + meta.size_bytes + _TAIL.size

    def write(self, meta: EntryMeta, payload: memoryview) -> None:
        """Atomically write the entry file (tmp + rename)."""
        assert len(payload) == meta.size_bytes
        path = self.path(meta.entry_id)
        path.parent.mkdir(exist_ok=True)
        head = _header(meta)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(_HEAD.pack(_MAGIC, len(head)))
            fh.write(head)
            fh.write(payload)
            fh.write(_TAIL.pack(xxhash.xxh3_64_intdigest(head), _END))
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)

    def read(self, meta: EntryMeta, offset: int, length: int) -> bytes:
        """``length`` payload bytes from ``offset``. Raises OSError if the file is gone."""
        with open(self.path(meta.entry_id), "rb") as fh:
            head_len = _HEAD.unpack(fh.read(_HEAD.size))[1]
            data = os.pread(fh.fileno(), length, _HEAD.size + head_len + offset)
        if len(data) != length:
            raise OSError(f"short read of {self.path(meta.entry_id)}")
        return data

    def remove(self, entry: EntryId) -> None:
        try:
            self.path(entry).unlink()
        except FileNotFoundError:
            pass

    def load(self, path: Path) -> EntryMeta:
        """Parse and check one file's framing; raise TornFile if it is not whole."""
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head_raw = fh.read(_HEAD.size)
            if len(head_raw) != _HEAD.size:
                raise TornFile("shorter than its preamble")
            magic, head_len = _HEAD.unpack(head_raw)
            if magic != _MAGIC or head_len > size:
                raise TornFile("bad magic or header length")
            head = fh.read(head_len)
            fh.seek(size - _TAIL.size)
            tail = fh.read(_TAIL.size)
        if len(tail) != _TAIL.size:
            raise TornFile("no trailer")
        checksum, end = _TAIL.unpack(tail)
        if end != _END or checksum != xxhash.xxh3_64_intdigest(head):
            raise TornFile("trailer or header checksum mismatch")
        try:
            meta = _meta_from_header(head)
        except (ValueError, KeyError, TypeError) as exc:
            raise TornFile(f"unparsable header: {exc}") from None
        if meta.entry_id.hex() != path.stem:
            raise TornFile("file name does not match the entry it holds")
        if size != _HEAD.size + head_len + meta.size_bytes + _TAIL.size:
            raise TornFile(f"size {size} does not match its header")
        return meta

    def scan(self) -> ScanResult:
        """Every whole entry file, oldest first; torn files and leftover tmps removed."""
        found: list[tuple[float, EntryMeta]] = []
        dropped: list[str] = []
        for path in (self.root / "entries").glob("*/*"):
            if path.suffix != ".ent":
                path.unlink(missing_ok=True)
                continue
            try:
                found.append((path.stat().st_mtime, self.load(path)))
            except (TornFile, OSError) as exc:
                log.warning("dropping torn entry file", extra={"path": str(path), "why": str(exc)})
                dropped.append(str(path))
                path.unlink(missing_ok=True)
        found.sort(key=lambda pair: pair[0])
        return ScanResult([meta for _, meta in found], dropped)
