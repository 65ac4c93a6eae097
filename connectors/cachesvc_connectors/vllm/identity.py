"""Who a vLLM engine is to the cache: the model's family and id, its weights digest, and
the extra keys of one request. The same functions as the HF connector's
(``hf.family``), so both engines name the same model's chunks alike.

- **family**: ``hf.family.family_of`` over vLLM's HF config and tokenizer, with slabs in
  the KV cache's dtype (fp32, bf16, fp16; a quantized KV cache is refused);
- **weights digest**: ``cachesvc.weights_digest`` if given, else the checkpoint's
  (``hf.family.checkpoint_digest``: vLLM fuses and renames parameters in memory, so an
  in-memory digest could never equal the HF engine's);
- **extra keys** (part of every chunk hash): the LoRA adapter's name and id, and the
  request's ``cache_salt``. Two requests that differ in either never share a chunk.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cachesvc.wire.keys import DType, FamilyId, FamilySpec, ModelId
from cachesvc_connectors.hf.family import checkpoint_digest, family_of

_DTYPES = {torch.float32: DType.FLOAT32, torch.bfloat16: DType.BFLOAT16, torch.float16: DType.FLOAT16}


@dataclass(frozen=True)
class ConnectorConfig:
    """``kv_connector_extra_config`` keys, all prefixed ``cachesvc.``."""

    address: str = "127.0.0.1:7070"
    tenant: str = ""
    model_id: str = ""                 # default: vLLM's served model name
    weights_digest: str = ""           # default: the checkpoint's digest
    producers: tuple[str, ...] = ()    # other models whose entries may be reused whole (profile permitting)
    min_quality: float = 0.95          # a cross-model pair's profiled quality of full reuse must reach this
    load: bool = True
    save: bool = True
    transport: str | None = None       # data-plane path; None: the SDK's choice

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "ConnectorConfig":
        known = {f"cachesvc.{name}" for name in cls.__dataclass_fields__}
        unknown = sorted(k for k in extra if k.startswith("cachesvc.") and k not in known)
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys {unknown}; known: {sorted(known)}")
        values = {k.removeprefix("cachesvc."): v for k, v in extra.items() if k in known}
        if "producers" in values:
            values["producers"] = tuple(values["producers"])
        return cls(**values)


@dataclass(frozen=True)
class EngineIdentity:
    model_id: ModelId
    family: FamilySpec
    family_id: FamilyId
    weights_digest: str


def engine_identity(vllm_config, config: ConnectorConfig) -> EngineIdentity:
    """The identity of the model ``vllm_config`` serves (no RPC: both roles compute it)."""
    from transformers import AutoTokenizer
    model_config = vllm_config.model_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in ("auto", None):
        raise ValueError(f"kv cache dtype {cache_dtype!r}: cachesvc stores K/V in the model's dtype only")
    dtype = _DTYPES.get(model_config.dtype)
    if dtype is None:
        raise ValueError(f"model dtype {model_config.dtype} has no slab dtype (fp32, bf16, fp16)")
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer, trust_remote_code=model_config.trust_remote_code)
    family = family_of(types.SimpleNamespace(config=model_config.hf_config), tokenizer, dtype)
    digest = config.weights_digest or checkpoint_digest(Path(model_config.model))
    model_id = config.model_id or model_config.served_model_name
    if isinstance(model_id, (list, tuple)):
        model_id = model_id[0]
    return EngineIdentity(ModelId(model_id), family, family.family_id(), digest)


def extra_keys(request) -> tuple[str, ...]:
    """What else than its tokens names a request's KV: LoRA adapter and cache salt."""
    keys = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        keys.append(f"lora={lora.lora_name}#{lora.lora_int_id}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        keys.append(f"cache_salt={salt}")
    return tuple(keys)
