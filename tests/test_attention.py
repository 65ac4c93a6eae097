"""Attention split after reused keys (connectors/cachesvc_connectors/hf/attention.py):
equal to one masked SDPA, and the decoder's layers give the same hidden states with it
as through the explicit mask they used before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cachesvc_connectors.hf import DecoderStack
from cachesvc_connectors.hf.attention import SPLIT_SDPA, split_attention
from hf_models import greedy, tiny_model


class _Module:
    num_key_value_groups = 3
    is_causal = True


def _qkv(q_len: int, kv_len: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(q_len * 1000 + kv_len)
    q = torch.randn(1, 6, q_len, 16, generator=gen).to(dtype)
    k, v = (torch.randn(1, 2, kv_len, 16, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


def _reference(q, k, v, mask):
    k, v = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("visible,q_len", [(1, 40), (37, 40), (200, 9)])
def test_a_causal_tail_after_visible_keys_equals_one_masked_attention(visible, q_len):
    q, k, v = _qkv(q_len, visible + q_len)
    whole = torch.ones(q_len, visible + q_len, dtype=torch.bool).tril(visible)[None, None]
    out, _ = split_attention(_Module(), q, k, v, None, visible_keys=visible)
    assert torch.allclose(out, _reference(q, k, v, whole), atol=1e-5)


def test_scattered_queries_after_visible_keys_equal_one_masked_attention():
    kv_len, first = 120, 30
    positions = torch.tensor([30, 31, 32, 70, 71, 100, 119])
    q, k, v = _qkv(len(positions), kv_len)
    whole = (torch.arange(kv_len)[None] <= positions[:, None])[None, None]
    out, _ = split_attention(_Module(), q, k, v, whole[..., first:], visible_keys=first)
    assert torch.allclose(out, _reference(q, k, v, whole), atol=1e-5)
    # A half-precision model: merged in fp32, within the dtype's rounding.
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    out, _ = split_attention(_Module(), *half, whole[..., first:], visible_keys=first)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), _reference(*half, whole).float(), atol=3e-2)


def test_without_a_split_it_is_transformers_sdpa():
    q, k, v = _qkv(5, 5)
    out, _ = split_attention(_Module(), q, k, v, None)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    assert torch.allclose(out, _reference(q, k, v, causal), atol=1e-6)


def _stack_pair(arch: str = "llama"):
    """The same model run by a stack that splits and by one that masks (sdpa)."""
    model = tiny_model(arch, num_layers=3)
    stack = DecoderStack(model)
    return model, stack


@torch.no_grad()
def _suffix_hidden(model, stack, ids: list[int], prefix: int) -> torch.Tensor:
    cache = stack.new_cache()
    stack.run(stack.embed(stack.ids(ids[:prefix])), 0, stack.num_layers, 0, cache)
    return stack.run(stack.embed(stack.ids(ids[prefix:])), 0, stack.num_layers, prefix, cache)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_uncached_suffix_is_the_same_split_or_masked(arch):
    model, stack = _stack_pair(arch)
    assert model.config._attn_implementation == SPLIT_SDPA
    ids = [(7 * i) % 250 for i in range(90)]
    split = _suffix_hidden(model, stack, ids, 61)
    model.set_attn_implementation("sdpa")          # the stack notices and masks instead
    masked = _suffix_hidden(model, stack, ids, 61)
    assert torch.allclose(split, masked, atol=1e-5)
    own = model.model(input_ids=stack.ids(ids)).last_hidden_state
    assert torch.allclose(model.model.norm(split), own[:, 61:], atol=1e-4)


@torch.no_grad()
def test_tokens_computed_at_scattered_positions_are_the_same_split_or_masked():
    model, stack = _stack_pair()
    ids = [(11 * i) % 250 for i in range(80)]
    cache = stack.new_cache()
    stack.run(stack.embed(stack.ids(ids)), 0, 1, 0, cache)      # layer 0's K/V of every token
    keys, values = cache.layers[0].keys, cache.layers[0].values
    for positions in (torch.tensor([20, 21, 22, 50, 51, 79]), torch.arange(45, 80)):
        hidden = stack.embed(stack.ids([ids[p] for p in positions.tolist()]))
        model.set_attn_implementation(SPLIT_SDPA)
        split = stack.run_at(hidden, 0, positions, keys.clone(), values.clone())
        model.set_attn_implementation("sdpa")
        masked = stack.run_at(hidden, 0, positions, keys.clone(), values.clone())
        assert torch.allclose(split, masked, atol=1e-5)


def test_the_models_own_generate_is_unchanged_by_the_switch():
    model = tiny_model(num_layers=3)
    ids = [(5 * i) % 250 for i in range(40)]
    before = greedy(model, ids)
    DecoderStack(model)
    assert model.config._attn_implementation == SPLIT_SDPA
    assert greedy(model, ids) == before
