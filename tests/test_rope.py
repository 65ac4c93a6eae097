"""Re-positioning stored keys (issue 16): a context prefilled at offset d caches exactly the
keys of the same context prefilled at 0, rotated by d, on every layer, for each rotary
type that allows it; the others are refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from cachesvc_connectors.hf import DecoderStack, UnsupportedModelError
from cachesvc_connectors.hf.rope import Repositioner
from hf_models import tiny_model

SCALINGS = {
    "default": {},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 512}},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
}


def _tolerance(keys: torch.Tensor, offset: int) -> float:
    """The model computes its own angles (position × frequency) in float32, so its keys at
    ``offset`` are off from the exact rotation by ~6e-8 rad per position (the shift's
    angles are float64): the tolerance grows with the offset, scaled by the keys' size."""
    return (2e-6 + 6e-8 * offset) * keys.abs().max().item()


@torch.no_grad()
def _keys_at(model, ids: list[int], start: int) -> torch.Tensor:
    """Every layer's cached keys of ``ids`` prefilled at positions start.., [L, T, H, D]."""
    cache = DynamicCache()
    positions = torch.arange(start, start + len(ids)).unsqueeze(0)
    model.model(input_ids=torch.tensor([ids]), position_ids=positions, past_key_values=cache, use_cache=True)
    return torch.stack([layer.keys[0].transpose(0, 1) for layer in cache.layers])


@pytest.mark.parametrize("arch, overrides", [("llama", SCALINGS["default"]), ("llama", SCALINGS["linear"]),
                                             ("llama", SCALINGS["llama3"]), ("llama", SCALINGS["yarn"]),
                                             ("gemma3", {"sliding_window": 64})],
                         ids=["default", "linear", "llama3", "yarn", "gemma3-two-bases"])
def test_keys_move_exactly_to_any_offset(arch, overrides):
    model = tiny_model(arch, seed=0, num_layers=6 if arch == "gemma3" else 4, **overrides)
    ids = list(range(3, 43))
    shift = Repositioner(DecoderStack(model))
    at_zero = _keys_at(model, ids, 0)
    for offset in (1, 37, 1000):
        moved = shift.shift(at_zero, offset)
        assert torch.allclose(moved, _keys_at(model, ids, offset), atol=_tolerance(at_zero, offset), rtol=0), offset
    # ...and back: position-normalized keys from a segment stored at 1000
    back = shift.shift(_keys_at(model, ids, 1000), -1000)
    assert torch.allclose(back, at_zero, atol=_tolerance(at_zero, 1000), rtol=0)
    # The test can fail: a wrong offset is far off.
    assert not torch.allclose(shift.shift(at_zero, 36), _keys_at(model, ids, 37), atol=1e-3)


def test_one_offset_per_token_and_a_subset_of_layers():
    model = tiny_model("gemma3", seed=1, num_layers=6, sliding_window=64)
    shift = Repositioner(DecoderStack(model))
    ids = list(range(5, 25))
    at_zero, at_50 = _keys_at(model, ids, 0), _keys_at(model, ids, 50)
    per_token = shift.shift(at_zero[[5, 1]], torch.full((len(ids),), 50), layers=[5, 1])   # full + sliding
    assert torch.allclose(per_token, at_50[[5, 1]], atol=2e-5, rtol=1e-4)
    bf16 = shift.shift(at_zero.to(torch.bfloat16), 50)
    assert bf16.dtype == torch.bfloat16 and torch.allclose(bf16.float(), at_50, atol=5e-2)
    with pytest.raises(ValueError, match="one per token"):
        shift.shift(at_zero, torch.zeros(3))
    with pytest.raises(ValueError, match=r"keys must be \[layers, tokens, kv_heads, 16\]"):
        shift.shift(at_zero[..., :8], 1)


def test_sequence_length_dependent_rotary_types_are_refused():
    model = tiny_model("llama", seed=0, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="rotary type 'dynamic'"):
        Repositioner(DecoderStack(model))
