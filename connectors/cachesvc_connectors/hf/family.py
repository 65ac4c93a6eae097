"""A HuggingFace model's family fingerprint and weights digest.

Two models may share cache entries only when their families are equal: same
architecture, shapes, RoPE parameters and tokenizer (its full serialized definition,
not just the vocabulary size), and the same slab dtype. The weights digest names one set
of weights within the family; a changed model gets a new digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from cachesvc.wire.keys import DType, FamilyId, FamilySpec, ModelId, canonical_json

class FamilyMismatchError(ValueError):
    """A consumer asked to reuse entries of a producer from another family."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer,
    pre-tokenizer, special tokens) for fast tokenizers; of its vocabulary otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = canonical_json(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def family_of(model, tokenizer, dtype: DType = DType.BFLOAT16) -> FamilySpec:
    """The family of a causal LM, with slabs stored as ``dtype``."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    rope = dict(getattr(text, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", getattr(text, "rope_theta", 10000.0)))
    if rope.get("rope_type") == "default" and len(rope) == 1:
        rope = {}
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True):
        rope["sliding_window"] = window   # changes every layer's K/V: part of the family
    return FamilySpec(
        architecture=(config.architectures or [type(model).__name__])[0],
        num_layers=text.num_hidden_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        hidden_size=text.hidden_size,
        rope_theta=theta,
        rope_scaling_json=canonical_json(rope) if rope else "",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        dtype=dtype)


def weights_digest(model) -> str:
    """xxh3-128 over every parameter and buffer of the state dict, names included
    (~0.1 s for 135M parameters; an identity check, not a security boundary)."""
    digest = xxhash.xxh3_128()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_digest(path: str | Path) -> str:
    """xxh3-128 over every tensor of a safetensors checkpoint directory, names included,
    in name order: the same digest whichever engine loads it (vLLM renames and fuses
    parameters in memory, so an in-memory digest differs between engines). Give it as
    ``weights_digest`` to each engine's connector to share one cache between them."""
    from safetensors import safe_open
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}: pass a weights digest explicitly")
    digest = xxhash.xxh3_128()
    tensors = {}
    for file in files:
        with safe_open(str(file), "pt") as fh:
            tensors.update((name, (file, name)) for name in fh.keys())
    for name in sorted(tensors):
        file, key = tensors[name]
        with safe_open(str(file), "pt") as fh:
            tensor = fh.get_tensor(key)
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ModelRegistration:
    """A model registered with the service: its family and weights digest."""

    model_id: ModelId
    family: FamilySpec
    family_id: FamilyId
    weights_digest: str


def register(client, model, tokenizer, model_id: ModelId, dtype: DType,
             digest: str | None = None) -> ModelRegistration:
    """Register ``model`` as ``model_id`` (idempotent for the same weights); ``digest``
    overrides the in-memory weights digest (e.g. :func:`checkpoint_digest`)."""
    family = family_of(model, tokenizer, dtype)
    digest = digest or weights_digest(model)
    return ModelRegistration(model_id, family, client.register_model(model_id, digest, family).family_id, digest)
