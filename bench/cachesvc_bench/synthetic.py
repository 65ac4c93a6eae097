"""Random-weight model pairs at real models' shapes, for timing where weights can't travel.

TTFT depends on a model's shape, not its weights, so a (producer, consumer) pair of
random weights at a real model's shape times reuse as the real pair would. The consumer
is the producer with its upper third of layers perturbed, the shape of a fine-tune
adapted on a subset of layers. Task quality means nothing here: only fidelity to the
consumer's own prefill is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    arch: str = "llama"               # "llama" or "gemma3" (sliding-window layers)
    head_dim: int | None = None       # None: hidden / heads
    sliding_window: int | None = None


SHAPES = {
    "smollm2-135m": Shape(30, 576, 9, 3, 1536, 49152),
    "llama-3.2-1b": Shape(16, 2048, 32, 8, 8192, 128256),
    "llama-3.1-8b": Shape(32, 4096, 32, 8, 14336, 128256),
    # Gemma 3 270M: 15 of 18 layers slide over 512 tokens (5 sliding, then 1 full).
    "gemma3-270m": Shape(18, 640, 4, 1, 2048, 262144, "gemma3", 256, 512),
    # Compute and bytes negligible: what is left of a request is the reuse path's fixed cost.
    "llama-tiny": Shape(2, 64, 4, 2, 128, 256),
    # Seconds, not minutes: for the benchmarks' own tests (5 sliding layers of 64 tokens, 1 full).
    "gemma3-tiny": Shape(6, 64, 4, 1, 128, 256, "gemma3", 16, 64),
}


def tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` made-up words (the family needs one)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    words = {f"w{i}": i for i in range(vocab - 1)} | {"[UNK]": vocab - 1}
    tok = Tokenizer(WordLevel(words, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")


def random_sample(rng, tokens: int, question: list[int], vocab: int) -> tuple[list[int], list[int], str]:
    """A random ``tokens``-token context, the prompt (context then ``question``), no answer."""
    context = [rng.randrange(vocab) for _ in range(tokens)]
    return context, context + question, ""


def adapted_layers(shape: Shape) -> range:
    """The consumer's perturbed layers: the upper third."""
    return range(round(shape.layers * 2 / 3), shape.layers)


def default_plan(shape: Shape) -> tuple[int, int]:
    """The first ~13% of layers of the adapted block ([20,24) on SmolLM2's 30 layers)."""
    start = adapted_layers(shape).start
    return start, min(shape.layers, start + max(1, round(shape.layers * 4 / 30)))


def _build(shape: Shape, device: str, dtype: torch.dtype, count: int) -> list:
    """``count`` random-weight models at ``shape`` (seeded; the same weights each call)."""
    if shape.arch == "gemma3":
        from transformers import Gemma3ForCausalLM as cls, Gemma3TextConfig as config_cls
        extra = dict(head_dim=shape.head_dim, sliding_window=shape.sliding_window,
                     query_pre_attn_scalar=shape.head_dim, tie_word_embeddings=True)
    else:
        from transformers import LlamaConfig as config_cls, LlamaForCausalLM as cls
        extra = dict(tie_word_embeddings=False)
    config = config_cls(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                        num_key_value_heads=shape.kv_heads, max_position_embeddings=8192,
                        architectures=[cls.__name__], **extra)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)    # built in ``dtype``: an 8B model in fp32 would double the peak
    try:
        with torch.device(device):
            return [cls(config).eval() for _ in range(count)]
    finally:
        torch.set_default_dtype(default)


def _dtype(device: str, dtype: torch.dtype | None) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU (whose bf16 matmuls are many times slower here)."""
    return dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16)


def model(name: str, device: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) at ``SHAPES[name]``, random weights, built on ``device``."""
    shape = SHAPES[name]
    return _build(shape, device, _dtype(device, dtype), 1)[0], tokenizer(shape.vocab)


@torch.no_grad()
def pair(name: str, device: str, dtype: torch.dtype | None = None):
    """(producer, consumer, tokenizer) at ``SHAPES[name]``, built on ``device``."""
    s, dtype = SHAPES[name], _dtype(device, dtype)
    producer, consumer = _build(s, device, dtype, 2)
    consumer.load_state_dict(producer.state_dict())
    gen = torch.Generator(device=device).manual_seed(1)
    for layer in adapted_layers(s):
        for param in consumer.model.layers[layer].parameters():
            noise = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
            param.add_((noise * 0.5 * param.float().std()).to(dtype))
    return producer, consumer, tokenizer(s.vocab)
