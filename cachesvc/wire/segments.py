"""Records of cross-context reuse shared by the node, the SDK and the connectors: where a
segment's K/V can be read (:class:`SegmentSource`) and the anchor pool's records
(:class:`AnchorInfo`, :class:`AnchorDelta`). No tensors here; see docs/agents.md.

A source names a span of a stored chain: ``chunk_hashes`` from the chain's root through
the chunk holding the span's last token, ``offset`` the span's first token in it. A prompt
that a producer stored is such a chain (the span keeps the positions it was prefilled at,
and the reader re-rotates its keys); a segment stored on its own, position-normalized, is
a chain with ``offset`` 0.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_PREFIX_TOKENS = 512
"""A source keeps at most this many tokens before its span (to rank sources by how alike
their prefixes are); older ones say nothing the nearest 512 do not."""


def pack_prefix(tokens: Sequence[int]) -> bytes:
    """The last :data:`MAX_PREFIX_TOKENS` of ``tokens`` as u32 little-endian."""
    tail = list(tokens)[-MAX_PREFIX_TOKENS:]
    return struct.pack(f"<{len(tail)}I", *tail)


def unpack_prefix(data: bytes) -> list[int]:
    if len(data) % 4:
        raise ValueError(f"prefix_tokens must be whole u32 values, got {len(data)} bytes")
    return list(struct.unpack(f"<{len(data) // 4}I", data))


@dataclass(frozen=True, slots=True)
class SegmentSource:
    """Invariant: ``chunk_hashes`` is non-empty; ``length`` > 0."""

    producer: str
    chunk_hashes: tuple[bytes, ...]
    offset: int
    length: int
    prefix_tokens: bytes = b""       # pack_prefix of the tokens before the span
    # A position-normalized copy: K/V computed in some context, keys de-rotated to start
    # at 0 (offset 0, no prefix). Not a prompt's span, so never exact where it lands.
    normalized: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    def prefix(self) -> list[int]:
        return unpack_prefix(self.prefix_tokens)

    def same_span(self, other: SegmentSource) -> bool:
        return (self.producer, self.chunk_hashes, self.offset, self.length) == \
            (other.producer, other.chunk_hashes, other.offset, other.length)


@dataclass(frozen=True, slots=True)
class AnchorDelta:
    """One agent's measured offsets for an anchor, stored as entries of ``producer``:
    ΔPH over the placeholder's tokens, ΔPF over the template segment after it."""

    agent: str
    producer: str
    placeholder_hashes: tuple[bytes, ...]
    following_hashes: tuple[bytes, ...]
    following_length: int
    size_bytes: int = 0              # what the node measured of its entries

    def chains(self) -> tuple[tuple[bytes, ...], ...]:
        return tuple(c for c in (self.placeholder_hashes, self.following_hashes) if c)


@dataclass(slots=True)
class AnchorInfo:
    """An anchor of a placeholder's pool: content whose base K/V (``base``) and per-agent
    offsets (``deltas``, by agent) KVCOMM estimates other content's offsets from."""

    segment_key: bytes
    length: int
    base: SegmentSource
    deltas: dict[str, AnchorDelta] = field(default_factory=dict)
    activations: int = 0
    admitted_seq: int = 0

    @property
    def size_bytes(self) -> int:
        return sum(d.size_bytes for d in self.deltas.values())
