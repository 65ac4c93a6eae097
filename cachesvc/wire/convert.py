"""Conversions between domain records and their proto messages, shared by the servicer
and the SDK (so the two sides cannot drift apart)."""

from __future__ import annotations

from cachesvc.wire.keys import DType, FamilySpec
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
