"""The CacheBlend-style baseline (selective token recompute) on tiny models against a real
server: recomputing every token is the consumer's own prefill, recomputing none is the
plan that recomputes layer 0, and the share in between repairs part of full reuse."""

from __future__ import annotations

import pytest
import torch

from cachesvc_client import DType
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
from cachesvc_lab.blend import BlendConsumer, select
from cachesvc_connectors.reuse.plan import Plan
from hf_models import fine_tune_of, last_logits, tiny_model, tokenizer
from test_hf_connector import _prompt, _reuse_logits

FP32 = DType.FLOAT32


def _blend(client, model, tok, name: str, ratio: float) -> BlendConsumer:
    return BlendConsumer(client, model, tok, name, ConsumerOptions(dtype=FP32, producers=["p"]), ratio=ratio)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_recomputing_every_token_is_the_consumers_prefill(client, arch):
    overrides = {"sliding_window": 128} if arch == "gemma3" else {}   # the window through run_at's mask
    base, tok = tiny_model(arch, seed=0, **overrides), tokenizer()
    tuned = fine_tune_of(base, range(4), seed=3)
    ids = _prompt(600, seed=21)
    # Full chunks only, so the first prompt has an 88-token suffix beyond the reused 512.
    Producer(client, base, tok, "p", ProducerOptions(dtype=FP32, include_partial=False)).store(ids)
    for prompt in (ids + [4, 5, 6], ids[:512] + [7]):          # with a suffix; none beyond the last token
        logits, report = _reuse_logits(_blend(client, tuned, tok, "c", 1.0), prompt)
        assert report.mode == "cross_model" and report.reused_tokens == 512
        assert report.plan == "cacheblend 100%"
        assert torch.allclose(logits, last_logits(tuned, prompt), atol=1e-4, rtol=0)


def test_recomputing_no_token_is_the_plan_recomputing_layer_0(client):
    base, tok = tiny_model("llama", seed=0), tokenizer()
    tuned = fine_tune_of(base, range(4), seed=4)
    ids = _prompt(700, seed=22)
    Producer(client, base, tok, "p", ProducerOptions(dtype=FP32)).store(ids)
    blended, _ = _reuse_logits(_blend(client, tuned, tok, "c", 0.0), ids)
    layer0 = Consumer(client, tuned, tok, "c", ConsumerOptions(dtype=FP32, default_plan=Plan(4, ((0, 1),))))
    planned, _ = _reuse_logits(layer0, ids)
    assert torch.allclose(blended, planned, atol=1e-4, rtol=0)


def test_recomputing_more_tokens_repairs_more(client):
    """The error to the consumer's prefill falls as the share grows: the selected tokens
    are recomputed, the rest keep the producer's K/V."""
    base, tok = tiny_model("llama", seed=0), tokenizer()
    tuned = fine_tune_of(base, range(4), seed=5)
    ids = _prompt(700, seed=23)
    Producer(client, base, tok, "p", ProducerOptions(dtype=FP32)).store(ids)
    reference = last_logits(tuned, ids)
    errors = [(_reuse_logits(_blend(client, tuned, tok, "c", r), ids)[0] - reference).norm().item()
              for r in (0.0, 0.5, 1.0)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors


def test_select_keeps_the_most_deviating_cached_tokens_and_every_suffix_token():
    positions = torch.tensor([0, 3, 5, 8, 10, 11])     # 10, 11: suffix (n = 10)
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8])
    assert positions[select(positions, scores, 10, 2)].tolist() == [3, 8, 10, 11]
    assert positions[select(positions, scores, 10, 0)].tolist() == [10, 11]
    assert positions[select(positions, scores, 10, 9)].tolist() == [0, 3, 5, 8, 10, 11]
