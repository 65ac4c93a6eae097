"""Conversions between domain records and their proto messages, shared by the servicer
and the SDK (so the two sides cannot drift apart)."""

from __future__ import annotations

from cachesvc.wire.keys import DType, FamilySpec
from cachesvc.wire.segments import AnchorDelta, AnchorInfo, SegmentSource
from cachesvc.v1 import cachesvc_pb2 as pb


def family_to_proto(spec: FamilySpec) -> pb.FamilySpec:
    return pb.FamilySpec(architecture=spec.architecture, num_layers=spec.num_layers,
                         num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                         hidden_size=spec.hidden_size,
                         rope=pb.RopeSpec(theta=spec.rope_theta, scaling_json=spec.rope_scaling_json),
                         tokenizer_fingerprint=spec.tokenizer_fingerprint, dtype=int(spec.dtype))


def family_from_proto(msg: pb.FamilySpec) -> FamilySpec:
    """Raises ValueError for an unknown dtype value."""
    try:
        dtype = DType(msg.dtype)
    except ValueError:
        raise ValueError(f"family.dtype {msg.dtype} is not a known DType") from None
    return FamilySpec(msg.architecture, msg.num_layers, msg.num_kv_heads, msg.head_dim,
                      msg.hidden_size, msg.rope.theta, msg.rope.scaling_json,
                      msg.tokenizer_fingerprint, dtype)


def source_to_proto(src: SegmentSource) -> pb.SegmentSource:
    return pb.SegmentSource(producer=src.producer, chunk_hashes=list(src.chunk_hashes), offset=src.offset,
                            length=src.length, prefix_tokens=src.prefix_tokens, normalized=src.normalized)


def source_from_proto(msg: pb.SegmentSource) -> SegmentSource:
    return SegmentSource(msg.producer, tuple(bytes(h) for h in msg.chunk_hashes), msg.offset, msg.length,
                         bytes(msg.prefix_tokens), msg.normalized)


def delta_to_proto(delta: AnchorDelta) -> pb.AnchorDelta:
    return pb.AnchorDelta(agent=delta.agent, producer=delta.producer,
                          placeholder_hashes=list(delta.placeholder_hashes),
                          following_hashes=list(delta.following_hashes),
                          following_length=delta.following_length, size_bytes=delta.size_bytes)


def delta_from_proto(msg: pb.AnchorDelta) -> AnchorDelta:
    return AnchorDelta(msg.agent, msg.producer, tuple(bytes(h) for h in msg.placeholder_hashes),
                       tuple(bytes(h) for h in msg.following_hashes), msg.following_length, msg.size_bytes)


def anchor_to_proto(anchor: AnchorInfo) -> pb.AnchorInfo:
    return pb.AnchorInfo(segment_key=anchor.segment_key, length=anchor.length, base=source_to_proto(anchor.base),
                         deltas=[delta_to_proto(d) for d in anchor.deltas.values()],
                         activations=anchor.activations, admitted_seq=anchor.admitted_seq,
                         size_bytes=anchor.size_bytes)


def anchor_from_proto(msg: pb.AnchorInfo) -> AnchorInfo:
    deltas = {d.agent: d for d in map(delta_from_proto, msg.deltas)}
    return AnchorInfo(bytes(msg.segment_key), msg.length, source_from_proto(msg.base), deltas,
                      msg.activations, msg.admitted_seq)
