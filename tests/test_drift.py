"""The drift guard against a real server: a consumer swapped for another fine-tune
without re-profiling is demoted within 200 requests; the profiled consumer is not."""

from __future__ import annotations

import random

from cachesvc.wire.keys import DType
from cachesvc_connectors.reuse import DriftOptions
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
from cachesvc_connectors.hf.family import family_of, weights_digest
from cachesvc_connectors.profiler import Profiler, ProfilerOptions, StateFile, profile
from hf_models import fine_tune_of, tiny_model, tokenizer

FP32 = DType.FLOAT32
GUARD = DriftOptions(sample_fraction=0.5, window=20, min_samples=10, margin=0.1, max_new_tokens=4,
                     background=False)


def _setup(client, tmp_path):
    base, tok = tiny_model("llama", seed=0), tokenizer()
    tuned = fine_tune_of(base, range(2, 4))
    rng = random.Random(1)
    contexts = [[rng.randrange(255) for _ in range(300)] for _ in range(8)]
    samples = [(c[:60], c[:60] + [rng.randrange(255) for _ in range(5)]) for c in contexts[:4]]
    doc = profile(Profiler(base, tuned, ProfilerOptions(window_sizes=(1, 2, 4), dtype=FP32)),
                  samples, StateFile(tmp_path / "s.jsonl", {"t": 1}))
    producer = Producer(client, base, tok, "base", ProducerOptions(dtype=FP32))
    for context in contexts:
        producer.store(context)
    return base, tuned, tok, doc, contexts, rng


def _requests(consumer, contexts, rng, limit):
    for i in range(limit):
        consumer.generate(rng.choice(contexts) + [rng.randrange(255) for _ in range(4)],
                          max_new_tokens=4, do_sample=False)
        if consumer.guard.events:
            return i + 1
    return None


def test_swapped_consumer_is_demoted_and_the_profiled_one_is_not(client, tmp_path):
    base, tuned, tok, doc, contexts, rng = _setup(client, tmp_path)
    client.register_model("tuned", weights_digest(tuned), family_of(tuned, tok, FP32))
    client.put_profile("base", "tuned", weights_digest(base), weights_digest(tuned), doc)
    good = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=FP32, drift=GUARD))
    assert _requests(good, contexts, rng, 60) is None                 # the profile holds
    checked = good.guard.metrics()
    assert checked["sampled"] >= 20 and checked["checked_identical_rate"] == 1.0

    # Swapped for another fine-tune (adapted on layers 0-1) whose deployment copied the
    # old profile instead of re-profiling.
    swapped = fine_tune_of(base, range(0, 2), seed=3)
    client.register_model("tuned", weights_digest(swapped), family_of(swapped, tok, FP32), replace=True)
    client.put_profile("base", "tuned", weights_digest(base), weights_digest(swapped), doc)
    drifting = Consumer(client, swapped, tok, "tuned", ConsumerOptions(dtype=FP32, drift=GUARD))
    first_plan = drifting.plan_for("base")[0]
    took = _requests(drifting, contexts, rng, 200)
    assert took is not None and took <= 200
    drifting.guard.drain()
    [event] = drifting.guard.events
    assert event.plan == first_plan.describe() and event.rate < event.expected - 0.1
    [listed] = client.list_profiles("base", "tuned")          # the service knows: re-profile
    assert event.reported == "applied" and listed.flags == 1 and f"plan {event.plan} gave" in listed.flagged
    metrics = drifting.guard.metrics()
    assert metrics["demotions"] == 1 and metrics["flagged_pairs"] == ["base"]
    demoted_to = drifting.plan_for("base")[0]
    assert demoted_to is None or demoted_to.recomputed_layers > first_plan.recomputed_layers
    report = drifting.generate(contexts[0] + [1, 2, 3], max_new_tokens=2, do_sample=False)[1]
    assert report.mode == "prefill" if demoted_to is None else report.plan == demoted_to.describe()
