"""The planner's cost model and choice, and the consumer following it: the best quality
predicted to meet a TTFT target, the full prefill when it is the best that does."""

from __future__ import annotations

import dataclasses
import random

from cachesvc.wire.keys import DType
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
from cachesvc_connectors.hf.decoder import DecoderStack
from cachesvc_connectors.hf.family import family_of, weights_digest
from cachesvc_connectors.reuse.plan import Plan
from cachesvc_connectors.hf.calibrate import calibrate
from cachesvc_connectors.reuse import CostModel, choose
from cachesvc_connectors.profiler import Profiler, ProfilerOptions, StateFile, profile
from hf_models import fine_tune_of, tiny_model, tokenizer

L = 30
FRONTIER = [(Plan(L), 0.33), (Plan(L, ((20, 24),)), 0.96), (Plan(L, ((20, 30),)), 0.99)]


def _cost(**overrides) -> CostModel:
    fields = dict(c0=0.0, c1=1e-4, c2=0.0, num_layers=L, head_s=0.01, kv_bytes_per_token=384,
                  e_bytes_per_token=1152, bandwidth_Bps=1e9, fetch_overhead_s=0.0)
    return CostModel(**(fields | overrides))


def test_cost_model_predictions():
    cost = _cost()
    assert abs(cost.prefill_s(2020) - (30 * 0.202 + 0.01)) < 1e-9
    plan = Plan(L, ((20, 24),))
    assert cost.load_bytes(plan, 2000) == 2000 * (2 * 26 * 384 + 1152)
    compute, last = 4 * 0.202 + 26 * 0.002, 30 * 1e-4 + 0.01       # the last prompt token, the head
    assert abs(cost.predict(plan, 2000, 20) - (compute + last)) < 1e-9          # compute-bound
    slow = _cost(bandwidth_Bps=1e6)
    assert abs(slow.predict(plan, 2000, 20) - (slow.load_bytes(plan, 2000) / 1e6 + last)) < 1e-9
    # CacheBlend at 15%: layer 0 over all 2020 tokens, layer 1 over 600 + 20, the rest over 300 + 20.
    blend = 0.202 + 0.062 + 28 * 0.032
    assert abs(cost.predict_blend(0.15, 2000, 20) - (blend + last)) < 1e-9
    assert abs(_cost(request_s=0.5).prefill_s(2020) - (30 * 0.202 + 0.01 + 0.5)) < 1e-9
    cost.observe_load(4_000_000, 0.001)                                            # 4 GB/s measured
    assert 1e9 < cost.bandwidth_Bps < 4e9


def test_fixed_costs_are_what_the_layers_leave_unexplained():
    cost = _cost()
    # A prefill of 2020 tokens: 30 layers, the head, and 0.3 s the layers do not explain. A
    # full reuse of 2000 + 20: every layer over the 20 suffix tokens (compute-bound here),
    # the last token and the head, the same 0.3 s, and 0.05 s more.
    reuse = 0.3 + 0.05 + 30 * 0.002 + (30 * 1e-4 + 0.01)
    cost.fit_fixed_costs((2020, 30 * 0.202 + 0.01 + 0.3), (2000, 20, reuse))
    assert abs(cost.request_s - 0.3) < 1e-9 and abs(cost.fetch_overhead_s - 0.05) < 1e-9
    # A second, larger reuse: what grows with the loaded bytes is the per-byte cost.
    plain = _cost(request_s=0.3)                     # what the layers and the load explain

    def measured(n: int) -> float:
        return plain.predict(Plan(L), n, 20) + 0.05 + 2e-9 * plain.load_bytes(Plan(L), n)
    cost.fit_fixed_costs((2020, 30 * 0.202 + 0.01 + 0.3), (2000, 20, measured(2000)), (8000, 20, measured(8000)))
    assert abs(cost.copy_s_per_byte - 2e-9) < 1e-15 and abs(cost.fetch_overhead_s - 0.05) < 1e-9
    cost.fit_fixed_costs((2020, 1.0), (2000, 20, 0.0))             # faster than the layers: no negative cost
    assert cost.request_s == 0.0 and cost.fetch_overhead_s == 0.0 and cost.copy_s_per_byte == 0.0


def test_choice_under_three_targets():
    cost = _cost()
    assert choose(FRONTIER, cost, 2000, 20, 10.0).plan is None                     # prefill fits: quality 1
    mid = choose(FRONTIER, cost, 2000, 20, 1.0)
    assert mid.plan == Plan(L, ((20, 24),)) and mid.meets_target and mid.quality == 0.96
    tight = choose(FRONTIER, cost, 2000, 20, 0.01)
    assert tight.plan == Plan(L) and not tight.meets_target and "nothing meets" in tight.why
    assert choose(FRONTIER, cost, 2000, 20, None).plan == Plan(L)                # fastest
    exact = FRONTIER[:2] + [(Plan(L, ((20, 30),)), 1.0)]        # as good as a prefill, and faster
    assert choose(exact, cost, 2000, 20, 10.0).plan == Plan(L, ((20, 30),))


def test_calibration_on_a_real_layer_is_sane():
    model = tiny_model("llama", seed=0)
    cost = calibrate(DecoderStack(model), family_of(model, tokenizer(), DType.FLOAT32),
                               sizes=(8, 64, 256), repeats=1)
    assert min(cost.c0, cost.c1, cost.c2, cost.request_s) >= 0 and cost.c0 + cost.c1 > 0 and cost.head_s > 0
    assert cost.prefill_s(512) > cost.prefill_s(64)
    assert cost.kv_bytes_per_token == 2 * 16 * 4 and cost.e_bytes_per_token == 64 * 4


def test_consumer_follows_the_planner(client, tmp_path):
    base = tiny_model("llama", seed=0)
    tuned, tok = fine_tune_of(base, range(2, 4)), tokenizer()
    rng = random.Random(3)
    samples = []
    for _ in range(3):
        ctx = [rng.randrange(255) for _ in range(40)]
        samples.append((ctx, ctx + [rng.randrange(255) for _ in range(5)]))
    doc = profile(Profiler(base, tuned, ProfilerOptions(window_sizes=(1, 2), dtype=DType.FLOAT32)),
                  samples, StateFile(tmp_path / "s.jsonl", {"t": 1}))
    Producer(client, base, tok, "base", ProducerOptions(dtype=DType.FLOAT32)).store(samples[0][0] * 13)
    client.register_model("tuned", weights_digest(tuned), family_of(tuned, tok, DType.FLOAT32))
    client.put_profile("base", "tuned", weights_digest(base), weights_digest(tuned), doc)
    ids = samples[0][0] * 13 + [7, 8, 9]
    cost = CostModel(c0=0.0, c1=1e-3, c2=0.0, num_layers=4, head_s=0.0, kv_bytes_per_token=128,
                     e_bytes_per_token=256, bandwidth_Bps=1e12, fetch_overhead_s=0.0)
    loose = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=DType.FLOAT32, cost=cost, ttft_target_s=60))
    report = loose.prefill(ids).report       # a plan as good as the prefill ([2,4) is exact), and faster
    exact = min((r for r in doc["plans"] if r["frontier"] and r["quality"] == 1.0),
                key=lambda r: r["recomputed_layers"])
    assert report.mode == "cross_model" and report.plan == exact["plan"]
    slow_net = dataclasses.replace(cost, bandwidth_Bps=1.0)     # loading never pays: recompute
    report = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=DType.FLOAT32, cost=slow_net,
                                                                    ttft_target_s=60)).prefill(ids).report
    assert report.mode == "prefill" and report.fallback.startswith("planner: full prefill")
    tight = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=DType.FLOAT32, cost=cost,
                                                                   ttft_target_s=0.4, min_quality=0.0))
    report = tight.prefill(ids).report
    # 512 cached tokens: a prefill is predicted 4 × 0.522 s; a plan of k layers k × 0.515 s.
    assert report.mode == "cross_model" and report.recomputed_layers == 0
    assert report.predicted_ttft_s is not None and report.predicted_ttft_s <= 0.4


def test_the_consumer_side_fit_learns_fixed_costs_from_its_own_requests():
    """Requests that took what the layer model predicts plus 0.05 s and 2 ns per loaded
    byte (with noise): the online fit recovers both, and follows when they change."""
    truth = _cost(request_s=0.3)
    learner = _cost(request_s=0.3, fetch_overhead_s=5.0)        # a wrong start
    rng = random.Random(0)

    def took(n: int, overhead: float) -> float:
        plan = Plan(L, ((20, 24),)) if n % 2 else Plan(L)
        compute = plan.recomputed_layers * truth.layer_s(n + 20, 0) + (L - plan.recomputed_layers) * truth.layer_s(20, n)
        nbytes = truth.load_bytes(plan, n)
        return plan, max(nbytes / truth.bandwidth_Bps, compute) + overhead + 2e-9 * nbytes + rng.gauss(0, 1e-3)
    for i in range(40):
        n = rng.randrange(500, 8000)
        plan, t = took(n, 0.05)
        learner.observe_reuse(plan, n, 20, t)
        if i < 2:                                               # too few requests to replace anything
            assert learner.fetch_overhead_s == 5.0
    assert abs(learner.fetch_overhead_s - 0.05) < 0.01 and abs(learner.copy_s_per_byte - 2e-9) < 0.5e-9
    for _ in range(60):                                         # the host got slower: 0.2 s fixed
        n = rng.randrange(500, 8000)
        plan, t = took(n, 0.2)
        learner.observe_reuse(plan, n, 20, t)
    assert abs(learner.fetch_overhead_s - 0.2) < 0.02
