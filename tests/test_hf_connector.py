"""The HuggingFace connector on tiny random-weight models against a real server:
exactness of selective recompute, same-model reuse, partial hits, family refusal, and
recompute (never wrong data) when slabs are missing or rotten."""

from __future__ import annotations

import random

import pytest
import torch

from cachesvc_client import CacheClient, DType, Kind
from cachesvc_connectors.hf import (Consumer, ConsumerOptions, FamilyMismatchError, Producer,
                                    ProducerOptions, UnsupportedModelError)
from cachesvc_connectors.hf.loader import plan_requests
from cachesvc_connectors.reuse.plan import Plan
from hf_models import fine_tune_of, greedy, last_logits, tiny_model, tokenizer

FP32 = DType.FLOAT32   # exactness tests store fp32 slabs; bf16 would round E and K/V


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(255) for _ in range(n)]


@torch.no_grad()
def _reuse_logits(consumer: Consumer, ids: list[int]):
    """Logits at the last prompt position through the connector's cache, and its report."""
    pre = consumer.prefill(ids)
    out = consumer.model(input_ids=consumer.stack.ids(ids[-1:]), past_key_values=pre.cache)
    return out.logits[0, -1], pre.report


@pytest.fixture(scope="module")
def pair():
    """A base model and a fine-tune of it adapted on layers 2-3 only."""
    base = tiny_model("llama", seed=0)
    return base, fine_tune_of(base, range(2, 4)), tokenizer()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_plan_recomputing_every_layer_equals_full_prefill(client: CacheClient, arch):
    base, tok = tiny_model(arch, seed=0), tokenizer()
    # Every decoder layer differs; the embedding is shared, as in a LoRA fine-tune (E at
    # layer 0 is the producer's embedding output).
    other = fine_tune_of(base, range(4), seed=7)
    ids = _prompt(700)
    Producer(client, base, tok, f"{arch}-p", ProducerOptions(dtype=FP32)).store(ids)
    consumer = Consumer(client, other, tok, f"{arch}-c",
                        ConsumerOptions(dtype=FP32, default_plan=Plan.recompute_all(4)))
    logits, report = _reuse_logits(consumer, ids + [1, 2, 3])
    assert report.mode == "cross_model" and report.reused_tokens == 700   # with the stored partial chunk
    assert report.recomputed_layers == 4
    assert torch.allclose(logits, last_logits(other, ids + [1, 2, 3]), atol=1e-4, rtol=0)


def test_recomputing_the_adapted_layers_is_exact_and_full_reuse_is_not(client, pair):
    base, tuned, tok = pair
    ids = _prompt(700, seed=1)
    # Full chunks only: the 188-token suffix then runs through every reused layer and group.
    Producer(client, base, tok, "base", ProducerOptions(dtype=FP32, include_partial=False)).store(ids)
    reference = last_logits(tuned, ids + [9])
    errors = {}
    for plan in (Plan(4, ((2, 4),)), Plan.full_reuse(4)):
        consumer = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=FP32, default_plan=plan))
        logits, report = _reuse_logits(consumer, ids + [9])
        assert report.reused_tokens == 512 and report.plan == plan.describe()
        errors[plan.describe()] = (logits - reference).abs().max().item()
    assert errors["[2,4)"] < 1e-4
    assert errors["full reuse"] > 1e-2      # the test could tell a wrong plan apart


def test_loading_without_pipelining_gives_the_same_cache(client, pair):
    base, tuned, tok = pair
    ids = _prompt(600, seed=15)
    Producer(client, base, tok, "base", ProducerOptions(dtype=FP32)).store(ids)
    plan = Plan(4, ((1, 3),))
    got = [_reuse_logits(Consumer(client, tuned, tok, "tuned", ConsumerOptions(
        dtype=FP32, default_plan=plan, pipelined=pipelined)), ids) for pipelined in (True, False)]
    assert torch.equal(got[0][0], got[1][0])
    assert got[1][1].hidden_fraction == 0 and got[1][1].wait_s == got[1][1].fetch_s > 0   # all before compute


def test_a_cache_outlives_the_next_prefill_of_its_consumer(client):
    """Slabs land in staging buffers the next prefill reuses: a returned cache must not
    point into them (one KV head is the case where a transpose needs no copy)."""
    model, tok = tiny_model("llama", seed=3, num_key_value_heads=1), tokenizer()
    # 513 tokens: the cache holds the 512 reused ones and no suffix (which would copy).
    first, second = _prompt(513, seed=21), _prompt(513, seed=22)
    producer = Producer(client, model, tok, "mqa", ProducerOptions(dtype=FP32))
    consumer = Consumer(client, model, tok, "mqa", ConsumerOptions(dtype=FP32))
    producer.store(first)
    kept = consumer.prefill(first)
    producer.store(second)
    assert consumer.prefill(second).report.reused_tokens == 512
    out = model(input_ids=consumer.stack.ids(first[-1:]), past_key_values=kept.cache)
    assert kept.report.reused_tokens == 512
    assert torch.allclose(out.logits[0, -1], last_logits(model, first), atol=1e-4, rtol=0)


def test_plan_fetches_only_the_slabs_it_needs(client, pair):
    base, tuned, tok = pair
    ids = _prompt(520, seed=2)
    Producer(client, base, tok, "base", ProducerOptions(dtype=FP32, include_partial=False)).store(ids)
    plan = Plan(4, ((1, 2),))
    assert [(r.kinds, r.start, r.stop) for r in plan_requests(plan)] == [
        ((Kind.E,), 1, 2), ((Kind.K, Kind.V), 0, 1), ((Kind.K, Kind.V), 2, 4)]
    consumer = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=FP32, default_plan=plan))
    _, report = _reuse_logits(consumer, ids)
    slab = 512 * 4   # 512 tokens × fp32
    kv_layer = 2 * slab * 2 * 16            # K and V: 2 kv heads × head_dim 16
    assert report.bytes_fetched == 3 * kv_layer + slab * 64   # 3 reused layers + one E


def test_same_model_reuse_gives_the_same_greedy_output(client, pair):
    base, _, tok = pair
    ids = _prompt(600, seed=3)
    Producer(client, base, tok, "base", ProducerOptions(dtype=FP32)).store(ids)
    consumer = Consumer(client, base, tok, "base", ConsumerOptions(dtype=FP32))
    out, report = consumer.generate(ids, max_new_tokens=12, do_sample=False)
    assert report.mode == "same_model" and report.reused_tokens == 599
    assert out[0, len(ids):].tolist() == greedy(base, ids, 12)


def test_sampling_settings_reach_generate(client, pair):
    base, _, tok = pair
    ids = _prompt(600, seed=4)
    Producer(client, base, tok, "base", ProducerOptions(dtype=FP32)).store(ids)
    consumer = Consumer(client, base, tok, "base", ConsumerOptions(dtype=FP32))
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=50)
    torch.manual_seed(11)
    out, _ = consumer.generate(ids, **kwargs)
    torch.manual_seed(11)
    input_ids = consumer.stack.ids(ids)
    full = base.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    assert out[0].tolist() == full[0].tolist()


def test_partial_hits_and_a_trailing_partial_chunk(client, pair):
    base, _, tok = pair
    shared = _prompt(600, seed=5)
    Producer(client, base, tok, "base", ProducerOptions(dtype=FP32, include_partial=True)).store(shared)
    consumer = Consumer(client, base, tok, "base", ConsumerOptions(dtype=FP32))
    # The same 600 tokens: two full chunks and the stored 88-token tail (less the last
    # token, which generate() runs).
    out, report = consumer.generate(shared, max_new_tokens=6, do_sample=False)
    assert report.reused_tokens == 599 and out[0, 600:].tolist() == greedy(base, shared, 6)
    # The first chunk shared, then a different continuation: only chunk 0 is reused.
    diverging = shared[:256] + _prompt(300, seed=6)
    out, report = consumer.generate(diverging, max_new_tokens=6, do_sample=False)
    assert report.reused_tokens == 256 and out[0, 556:].tolist() == greedy(base, diverging, 6)


def test_a_question_after_a_context_that_ends_mid_chunk_reuses_the_whole_context(client, pair):
    """Issue 13: the producer stores its trailing partial chunk by default, and a prompt
    of that context plus a question reuses all of it (600 tokens, not 512)."""
    base, _, tok = pair
    context, question = _prompt(600, seed=7), _prompt(40, seed=8)
    Producer(client, base, tok, "base", ProducerOptions(dtype=FP32)).store(context)
    consumer = Consumer(client, base, tok, "base", ConsumerOptions(dtype=FP32))
    out, report = consumer.generate(context + question, max_new_tokens=6, do_sample=False)
    assert report.reused_tokens == 600 and report.mode == "same_model"
    assert out[0, 640:].tolist() == greedy(base, context + question, 6)


def test_consumer_of_another_family_is_refused_by_name(client, pair):
    base, _, tok = pair
    Producer(client, base, tok, "base").store(_prompt(300))
    stranger = tiny_model("llama", seed=3)
    with pytest.raises(FamilyMismatchError, match="producer 'base' is of family .* not shareable"):
        Consumer(client, stranger, tokenizer("other"), "stranger", ConsumerOptions(producers=["base"]))
    wider = tiny_model("llama", seed=3, num_key_value_heads=4)
    with pytest.raises(FamilyMismatchError):
        Consumer(client, wider, tok, "wider", ConsumerOptions(producers=["base"]))
    # Unnamed, another family simply never sees the entries: it prefills.
    consumer = Consumer(client, wider, tok, "wider", ConsumerOptions(default_plan=Plan.full_reuse(4)))
    assert consumer.prefill(_prompt(300)).report.mode == "prefill"


def test_cross_model_without_a_plan_prefills(client, pair):
    base, tuned, tok = pair
    ids = _prompt(600, seed=8)
    Producer(client, base, tok, "base", ProducerOptions(dtype=FP32)).store(ids)
    consumer = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=FP32))
    logits, report = _reuse_logits(consumer, ids)
    assert report.mode == "prefill" and "no plan for producer 'base'" in report.fallback
    assert torch.allclose(logits, last_logits(tuned, ids), atol=1e-4, rtol=0)


def test_producer_storing_e_only_at_transition_layers(client, pair):
    base, tuned, tok = pair
    ids = _prompt(600, seed=9)
    Producer(client, base, tok, "base", ProducerOptions(dtype=FP32, e_layers=(2,))).store(ids)
    plans = {"[2,4)": Plan(4, ((2, 4),)), "[1,4)": Plan(4, ((1, 4),))}
    good = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=FP32, default_plan=plans["[2,4)"]))
    _, report = _reuse_logits(good, ids)
    assert report.mode == "cross_model" and report.reused_tokens == 599
    lacking = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=FP32, default_plan=plans["[1,4)"]))
    _, report = _reuse_logits(lacking, ids)
    assert report.mode == "prefill" and "lacks slabs" in report.fallback


def test_deleted_chunk_means_recompute_from_there(client, pair):
    base, _, tok = pair
    ids = _prompt(800, seed=10)
    producer = Producer(client, base, tok, "base", ProducerOptions(dtype=FP32))
    producer.store(ids)
    hashes = client.hash_tokens(ids, producer.family_id)
    client.delete(producer.family_id, chunk_hashes=[hashes[1]])
    consumer = Consumer(client, base, tok, "base", ConsumerOptions(dtype=FP32))
    out, report = consumer.generate(ids, max_new_tokens=6, do_sample=False)
    assert report.reused_tokens == 256 and out[0, 800:].tolist() == greedy(base, ids, 6)


def test_rotten_slab_is_recomputed_never_used(server_factory, pair):
    base, tuned, tok = pair
    ids = _prompt(800, seed=12)
    srv = server_factory("--memory-bytes", "64MiB")
    with CacheClient(srv.address) as client:
        producer = Producer(client, base, tok, "base", ProducerOptions(dtype=FP32))
        producer.store(ids)
        hit = client.lookup(producer.family_id, client.hash_tokens(ids, producer.family_id)).best()
    srv.stop()
    again = server_factory("--memory-bytes", "64MiB", workdir=srv.workdir)   # entries on disk now
    name = hit.entry_ids[1].hex()
    path = again.data_dir / "entries" / name[:2] / f"{name}.ent"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    path.write_bytes(bytes(raw))
    with CacheClient(again.address) as client:
        consumer = Consumer(client, base, tok, "base", ConsumerOptions(dtype=FP32))
        logits, report = _reuse_logits(consumer, ids)
        assert report.reused_tokens == 256 and "checksum mismatch" in report.fallback
        assert torch.allclose(logits, last_logits(base, ids), atol=1e-4, rtol=0)
        # The node dropped the rotten entry when it read it: now a shorter hit, same answer.
        consumer = Consumer(client, tuned, tok, "tuned",
                            ConsumerOptions(dtype=FP32, default_plan=Plan(4, ((2, 4),))))
        logits, report = _reuse_logits(consumer, ids)
        assert report.reused_tokens == 256 and report.mode == "cross_model"
        assert torch.allclose(logits, last_logits(tuned, ids), atol=1e-4, rtol=0)


def test_unreachable_data_plane_means_prefill(server_factory, pair):
    base, _, tok = pair
    ids = _prompt(600, seed=13)
    srv = server_factory("--memory-bytes", "64MiB")
    with CacheClient(srv.address) as client:
        Producer(client, base, tok, "base", ProducerOptions(dtype=FP32)).store(ids)
        consumer = Consumer(client, base, tok, "base", ConsumerOptions(dtype=FP32, transport="tcp"))
        transport = client._transport("tcp")
        transport.address = "127.0.0.1:1"        # the node's data port, gone
        transport.close()
        logits, report = _reuse_logits(consumer, ids)
        assert report.mode == "prefill" and "unreachable" in report.fallback
        assert torch.allclose(logits, last_logits(base, ids), atol=1e-4, rtol=0)


def test_context_longer_than_a_sliding_window_is_exact(client):
    """Every position is stored and reused; the window is applied by the mask."""
    base, tok = tiny_model("gemma3", seed=0, sliding_window=128), tokenizer()
    tuned = fine_tune_of(base, range(4))
    ids = _prompt(600, seed=14)
    Producer(client, base, tok, "g", ProducerOptions(dtype=FP32)).store(ids)
    consumer = Consumer(client, tuned, tok, "g2", ConsumerOptions(dtype=FP32, default_plan=Plan.recompute_all(4)))
    logits, report = _reuse_logits(consumer, ids)
    assert report.reused_tokens == 599
    assert torch.allclose(logits, last_logits(tuned, ids), atol=1e-4, rtol=0)
    out, _ = consumer.generate(ids, max_new_tokens=6, do_sample=False)
    assert out[0, 600:].tolist() == greedy(tuned, ids, 6)


def test_model_whose_decoder_loop_does_not_fit_is_refused_clearly():
    class NotADecoder(torch.nn.Module):
        config = None
    from cachesvc_connectors.hf import DecoderStack
    with pytest.raises(UnsupportedModelError, match="missing embed_tokens"):
        DecoderStack(NotADecoder())
    chunked = tiny_model("llama", seed=0)
    chunked.config.layer_types = ["chunked_attention"] + ["full_attention"] * 3
    with pytest.raises(UnsupportedModelError, match="layer types chunked_attention"):
        DecoderStack(chunked)


@pytest.mark.parametrize("plan", [None, "[2,6)"], ids=["same_model", "plan"])
def test_after_reuse_sliding_layers_hold_what_the_models_own_cache_holds(client, plan):
    """Issue 13: after reusing a 600-token context (window 128) behind a question, each
    sliding layer holds only its last window - 1 tokens, as after the model's own
    prefill, with the same values (so decode attends to as much as it would without
    reuse); full layers hold every token; the answer is the model's own. The plan reuses
    the sliding layers 0-1 and recomputes the rest (exact: the fine-tune differs on 2-3)."""
    from transformers import DynamicCache
    base, tok = tiny_model("gemma3", seed=0, num_layers=6, sliding_window=128), tokenizer()
    model, model_id = (base, "g6") if plan is None else (fine_tune_of(base, range(2, 4)), "g6-tuned")
    context, question = _prompt(600, seed=15), _prompt(30, seed=16)
    Producer(client, base, tok, "g6", ProducerOptions(dtype=FP32)).store(context)
    options = ConsumerOptions(dtype=FP32, default_plan=Plan.parse(plan, 6) if plan else None)
    ids = context + question
    pre = Consumer(client, model, tok, model_id, options).prefill(ids)
    assert pre.report.reused_tokens == 600 and pre.report.recomputed_layers == (0 if plan is None else 4)
    own = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=torch.tensor([ids[:-1]], device=model.device), past_key_values=own, use_cache=True)
    kinds = [type(layer).__name__ for layer in own.layers]
    assert kinds.count("DynamicSlidingWindowLayer") == 5
    for index, (mine, theirs) in enumerate(zip(pre.cache.layers, own.layers, strict=True)):
        assert type(mine) is type(theirs), index
        assert mine.get_seq_length() == theirs.get_seq_length() == len(ids) - 1
        assert mine.keys.shape == theirs.keys.shape, index      # 127 tokens on sliding layers, 629 on the full one
        assert torch.allclose(mine.keys, theirs.keys, atol=1e-4) and torch.allclose(mine.values, theirs.values, atol=1e-4)
    input_ids = torch.tensor([ids], device=model.device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         past_key_values=pre.cache, max_new_tokens=6, do_sample=False)
    assert out[0, len(ids):].tolist() == greedy(model, ids, 6)


@pytest.mark.parametrize("slab_dtype,cache_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                    (torch.float32, torch.float32)])
def test_append_layer_stores_slabs_head_major_in_the_cache_dtype(slab_dtype, cache_dtype):
    """Widening, narrowing and none: the cache layer holds the slabs as ``[1, heads,
    tokens, dim]`` of the model's dtype, in memory of its own (not the slabs')."""
    from transformers import DynamicCache

    from cachesvc_connectors.hf.consumer import append_layer

    keys, values = (torch.randn(40, 3, 8).to(slab_dtype) for _ in range(2))
    cache = DynamicCache()
    append_layer(cache, 0, keys, values, cache_dtype)
    got_k, got_v = cache.layers[0].keys, cache.layers[0].values
    assert got_k.dtype == got_v.dtype == cache_dtype and got_k.shape == (1, 3, 40, 8)
    assert torch.equal(got_k, keys.to(cache_dtype).transpose(0, 1).unsqueeze(0))
    assert torch.equal(got_v, values.to(cache_dtype).transpose(0, 1).unsqueeze(0))
    keys.zero_()
    assert got_k.abs().sum() > 0
