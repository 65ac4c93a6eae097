"""A GGUF model as a transformers safetensors folder, converted once.

transformers dequantizes a GGUF to fp32 on load (seconds to minutes), but cannot save a
GGUF-loaded model ("quantized with gguf and is not serializable"): the conversion copies
its state dict into a fresh model of the same class, without the quantization config,
and saves that with the tokenizer. Later loads take well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch


def convert(gguf: Path, out: Path) -> Path:
    """``out``, a safetensors copy of the model in ``gguf``, made on first use (written to
    a temporary folder and renamed, so an interrupted conversion leaves nothing half-done)."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
