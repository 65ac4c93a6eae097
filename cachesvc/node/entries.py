"""Entries and slabs: their records, payload layout, and validation of a put.

An entry's payload is its slabs packed back to back, kind-major (K, V, E) then
layer-ascending, so any contiguous layer range of one kind is one contiguous byte range.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from cachesvc.wire.errors import InvalidArgument
from cachesvc.wire.layout import Layout, intern_layout
from cachesvc.wire.keys import (CHUNK_HASH_BYTES, ChunkHash, DType, EntryId, FamilyId, FamilySpec,
                                Kind, entry_id)


@dataclass(frozen=True, slots=True)
class SlabSpec:
    """One (kind, layer) slab as requested by a writer, before placement."""

    kind: Kind
    layer: int                 # 0 <= layer < family.num_layers
    shape: tuple[int, ...]     # token-major, see FamilySpec.slab_shape
    dtype: DType
    checksum: int              # xxh3_64 of the slab bytes


@dataclass(frozen=True, slots=True)
class Slab:
    """A placed slab: where its bytes are inside the entry payload."""

    kind: Kind
    layer: int
    shape: tuple[int, ...]
    dtype: DType
    checksum: int
    offset: int                # byte offset inside the entry payload
    size_bytes: int


@dataclass(frozen=True, slots=True)
class EntryMeta:
    """Immutable description of one committed (or reserved) entry."""

    entry_id: EntryId
    tenant: str
    family_id: FamilyId
    chunk_hash: ChunkHash
    producer: str
    position_offset: int
    num_tokens: int
    slabs: tuple[Slab, ...]    # payload order: (kind, layer) ascending
    size_bytes: int            # total payload bytes
    layout: Layout = field(compare=False)
    # A partial chunk's parent in the chain (b"" for full chunks or when not given): what
    # lookups offer it after (docs/chunk-keys.md).
    parent_hash: bytes = b""

    def slab_run(self, kind: Kind, layer_start: int, layer_end: int) -> list[list[Slab]]:
        """The slabs of ``kind`` in [layer_start, layer_end), grouped in runs of
        consecutive layers (each run is contiguous in the payload). O(log slabs + hit):
        slabs are sorted by (kind, layer), so the kind's range is found by bisection."""
        base = sum(len(self.layout.layers(k)) for k in Kind if k < kind)
        layers = self.layout.layers(kind)
        lo = base + bisect.bisect_left(layers, layer_start)
        hi = base + bisect.bisect_left(layers, layer_end)
        runs: list[list[Slab]] = []
        for slab in self.slabs[lo:hi]:
            if runs and runs[-1][-1].layer + 1 == slab.layer:
                runs[-1].append(slab)
            else:
                runs.append([slab])
        return runs


def split_run(run: list[Slab], max_bytes: int) -> Iterator[list[Slab]]:
    """Split a run of slabs into pieces of about ``max_bytes`` (at least one slab each)."""
    piece: list[Slab] = []
    size = 0
    for slab in run:
        if piece and size + slab.size_bytes > max_bytes:
            yield piece
            piece, size = [], 0
        piece.append(slab)
        size += slab.size_bytes
    if piece:
        yield piece


def plan_entry(index: int, tenant: str, family_id: FamilyId, family: FamilySpec, producer: str,
               chunk_hash: bytes, position_offset: int, num_tokens: int,
               slabs: list[SlabSpec], chunk_size: int, parent_hash: bytes = b"") -> EntryMeta:
    """Validate one entry of a put against its family and place its slabs.

    Raises InvalidArgument naming ``entries[index]`` and the offending field.
    """
    where = f"entries[{index}]"
    if len(chunk_hash) != CHUNK_HASH_BYTES:
        raise InvalidArgument(f"{where}.chunk_hash has {len(chunk_hash)} bytes, "
                              f"expected {CHUNK_HASH_BYTES}")
    if not 1 <= num_tokens <= chunk_size:
        raise InvalidArgument(f"{where}.num_tokens must be in 1..{chunk_size} (chunk size), "
                              f"got {num_tokens}")
    if parent_hash and len(parent_hash) != CHUNK_HASH_BYTES:
        raise InvalidArgument(f"{where}.parent_hash has {len(parent_hash)} bytes, expected {CHUNK_HASH_BYTES} "
                              f"(or none)")
    if parent_hash and num_tokens == chunk_size:
        raise InvalidArgument(f"{where}.parent_hash is for partial chunks only: this one has the full "
                              f"{chunk_size} tokens")
    if not slabs:
        raise InvalidArgument(f"{where} has no slabs")
    seen: set[tuple[Kind, int]] = set()
    for j, spec in enumerate(slabs):
        _check_slab(f"{where}.slabs[{j}]", spec, family, num_tokens)
        key = (spec.kind, spec.layer)
        if key in seen:
            raise InvalidArgument(f"{where}.slabs[{j}] repeats {spec.kind.name} layer {spec.layer}")
        seen.add(key)
    placed: list[Slab] = []
    offset = 0
    for spec in sorted(slabs, key=lambda s: (s.kind, s.layer)):
        size = family.slab_bytes(spec.kind, num_tokens)
        placed.append(Slab(spec.kind, spec.layer, spec.shape, spec.dtype, spec.checksum,
                           offset, size))
        offset += size
    layout = intern_layout(Layout(
        num_tokens,
        *(tuple(s.layer for s in placed if s.kind == kind) for kind in (Kind.K, Kind.V, Kind.E))))
    return EntryMeta(entry_id(tenant, family_id, chunk_hash, producer, position_offset), tenant,
                     family_id, ChunkHash(bytes(chunk_hash)), producer, position_offset,
                     num_tokens, tuple(placed), offset, layout, bytes(parent_hash))


def _check_slab(where: str, spec: SlabSpec, family: FamilySpec, num_tokens: int) -> None:
    if spec.kind not in (Kind.K, Kind.V, Kind.E):
        raise InvalidArgument(f"{where}.kind must be K, V or E, got {int(spec.kind)}")
    if not 0 <= spec.layer < family.num_layers:
        raise InvalidArgument(f"{where}.layer {spec.layer} out of range: family has "
                              f"{family.num_layers} layers")
    if spec.dtype != family.dtype:
        got = spec.dtype.short_name if isinstance(spec.dtype, DType) else str(spec.dtype)
        raise InvalidArgument(f"{where}.dtype is {got}, family dtype is {family.dtype.short_name}")
    expected = family.slab_shape(spec.kind, num_tokens)
    if tuple(spec.shape) != expected:
        raise InvalidArgument(f"{where} ({spec.kind.name} layer {spec.layer}) has shape "
                              f"{list(spec.shape)}, expected {list(expected)} "
                              f"(token-major, {num_tokens} tokens)")
