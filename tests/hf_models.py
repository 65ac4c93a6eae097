"""Tiny random-weight transformers models and an offline tokenizer for connector tests."""

from __future__ import annotations

import copy
import os

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

VOCAB = 256
# Where the tiny models run: "cpu" in CI; "cuda" checks the connector's GPU path.
DEVICE = torch.device(os.environ.get("CACHESVC_TEST_DEVICE", "cpu"))


def tokenizer(variant: str = "") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB made-up words; ``variant`` changes the vocabulary
    (a different tokenizer, hence a different family)."""
    vocab = {f"w{variant}{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),   # sliding-window layers, rotary per layer type
}


def tiny_model(arch: str = "llama", seed: int = 0, num_layers: int = 4, **overrides):
    """A random-weight causal LM, fp32, eval mode. Same ``arch`` and overrides = same family."""
    config_cls, model_cls = ARCHITECTURES[arch]
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)
    if arch == "mistral":
        kwargs["sliding_window"] = 4096
    if arch == "gemma3":
        kwargs.update(head_dim=16, sliding_window=1024)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    model.config.architectures = [model_cls.__name__]
    return model.to(DEVICE)


def fine_tune_of(base, layers: range, seed: int = 1, scale: float = 0.5):
    """A copy of ``base`` whose decoder ``layers`` (only) are perturbed: a stand-in for a
    fine-tune adapted on a subset of layers."""
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for param in tuned.model.layers[layer].parameters():
                param.add_(torch.randn(param.shape, generator=gen).to(param.device) * scale * param.std())
    return tuned


@torch.no_grad()
def last_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's own full prefill: logits at the last prompt position."""
    return model(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=1).logits[0, -1]


@torch.no_grad()
def greedy(model, ids: list[int], new_tokens: int = 8) -> list[int]:
    input_ids = torch.tensor([ids], device=model.device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()
