"""The profiler on tiny random-weight pairs: exact plans score as exact, the adapted
layers are found, runs resume, and the consumer takes its plan from the service's
registry (or recomputes when no profiled plan is good enough)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from cachesvc.wire.keys import DType
from cachesvc_client import CacheClient
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
from cachesvc_connectors.hf.family import weights_digest
from cachesvc_connectors.reuse import Plan, best_plan
from cachesvc_connectors.profiler import (PlanResult, Profiler, ProfilerOptions, PlanScore, StateFile,
                                          frontier, multi_group_candidates, profile, single_windows)
from hf_models import fine_tune_of, tiny_model, tokenizer

FP32 = ProfilerOptions(window_sizes=(1, 2, 4), dtype=DType.FLOAT32, pilot_prompts=2)


def _samples(count: int, context: int = 48, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ctx = [rng.randrange(255) for _ in range(context)]
        out.append((ctx, ctx + [rng.randrange(255) for _ in range(6)]))
    return out


@pytest.fixture(scope="module")
def pair():
    base = tiny_model("llama", seed=0)
    return base, fine_tune_of(base, range(2, 4))


def test_windows_cover_every_size_and_the_top():
    plans = single_windows(30, (1, 6, 20))
    assert Plan(30, ((29, 30),)) in plans and Plan(30, ((24, 30),)) in plans and Plan(30, ((10, 30),)) in plans
    assert Plan(30, ((3, 9),)) not in plans and Plan(30, ((4, 10),)) in plans     # stride 2 for size 6
    assert Plan(30, ((3, 23),)) not in plans and Plan(30, ((5, 25),)) in plans    # stride 5 for size 20
    assert all(p.recomputed_layers in (1, 6, 20) for p in plans) and len(plans) == 30 + 13 + 3


def test_exact_plans_score_exact_and_the_profile_finds_the_adapted_layers(tmp_path, pair):
    base, tuned = pair
    state = StateFile(tmp_path / "p.state.jsonl", {"run": 1})
    doc = profile(Profiler(base, tuned, FP32), _samples(6), state)
    rows = {row["plan"]: row for row in doc["plans"]}
    assert rows["[0,4)"]["quality"] == 1.0 and rows["[0,4)"]["kl"] < 1e-6       # recompute all = prefill
    assert rows["[2,4)"]["quality"] == 1.0 and rows["[2,4)"]["kl"] < 1e-6       # the adapted layers: exact
    assert rows["full reuse"]["kl"] > 1e-3 and rows["[0,2)"]["kl"] > 1e-3       # the test can tell
    best = best_plan(doc, 1.0)
    assert best is not None and best.recomputed_layers <= 2 and best.groups[0][0] in (2, 3)
    assert doc["frontier"][0] == "full reuse" and [s["layer"] for s in doc["layer_sensitivity"]] == [0, 1, 2, 3]


def test_a_rerun_resumes_from_the_state_file(tmp_path, pair):
    base, tuned = pair
    path = tmp_path / "p.state.jsonl"
    first = profile(Profiler(base, tuned, FP32), _samples(3), StateFile(path, {"run": 2}))
    lines = path.read_text().splitlines()
    # As if killed while scoring phase 1's last prompt: header and two prompts remain.
    path.write_text("\n".join(lines[:3]) + "\n")
    assert [json.loads(line).get("prompt") for line in lines[1:3]] == [0, 1]
    profiler = Profiler(base, tuned, FP32)
    calls = []
    score = profiler.score_prompt
    profiler.score_prompt = lambda *a: calls.append(1) or score(*a)
    again = profile(profiler, _samples(3), StateFile(path, {"run": 2}))
    phase_two = any(row["multi_group"] for row in first["plans"])
    assert len(calls) == 1 + (2 if phase_two else 0)      # the pilot prompts score candidates again
    assert [r["quality"] for r in again["plans"]] == [r["quality"] for r in first["plans"]]
    with pytest.raises(ValueError, match="another profiling run"):
        StateFile(path, {"run": 3})


def test_multi_group_search_proposes_pairs_that_beat_single_windows():
    L = 8

    def result(groups, identical):
        r = PlanResult(Plan(L, groups))
        for x in identical:
            r.add(PlanScore(x, 1.0 - x, 0.0))
        return r
    base = result((), [0, 0, 0, 0])
    singles = [result(((1, 2),), [1, 1, 0, 0]), result(((5, 6),), [0, 0, 1, 1]),
               result(((1, 6),), [1, 1, 1, 0]), result(((3, 4),), [0, 0, 0, 0])]
    found = multi_group_candidates([base, *singles], base, L, max_groups=2, limit=5)
    assert Plan(L, ((1, 2), (5, 6))) in found                         # 2 layers beat [1,6)'s 5
    front = frontier([base, *singles])
    assert [r.plan.describe() for r in front] == ["full reuse", "[1,2)", "[1,6)"]


def test_consumer_takes_its_plan_from_the_registry_or_recomputes(client: CacheClient, tmp_path, pair):
    base, tuned = pair
    tok = tokenizer()
    doc = profile(Profiler(base, tuned, FP32), _samples(4), StateFile(tmp_path / "s.jsonl", {"run": 4}))
    producer = Producer(client, base, tok, "base", ProducerOptions(dtype=DType.FLOAT32))
    consumer = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=DType.FLOAT32))
    ids = [random.Random(9).randrange(255) for _ in range(600)]
    producer.store(ids)
    assert consumer.prefill(ids).report.fallback.endswith("(the pair is not profiled)")
    client.put_profile("base", "tuned", weights_digest(base), weights_digest(tuned), doc)
    consumer = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=DType.FLOAT32))
    report = consumer.prefill(ids).report
    assert report.mode == "cross_model" and report.plan == best_plan(doc, 0.95).describe()
    # A bar no plan clears: recompute, and say so.
    strict = Consumer(client, tuned, tok, "tuned", ConsumerOptions(dtype=DType.FLOAT32, min_quality=1.01))
    report = strict.prefill(ids).report
    assert report.mode == "prefill" and "reaches quality 1.01" in report.fallback
    # A changed consumer makes the profile stale: not used.
    changed = fine_tune_of(tuned, range(3, 4), seed=5)
    client.register_model("tuned", weights_digest(changed), consumer.registration.family, replace=True)
    fresh = Consumer(client, changed, tok, "tuned", ConsumerOptions(dtype=DType.FLOAT32))
    assert "stale" in fresh.prefill(ids).report.fallback


def test_profile_command_writes_plots_and_registers(server, client, tmp_path, pair):
    """``cachesvc profile`` as a user runs it, on HF model folders: the frontier with
    predicted TTFTs, the plot, and the profile in the service's registry."""
    base, tuned = pair
    tok = tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    for name, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rng = random.Random(5)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({
        "context": " ".join(f"w{rng.randrange(255)}" for _ in range(40)),
        "question": " ".join(f"w{rng.randrange(255)}" for _ in range(5)), "answer": ""}) for _ in range(3)))
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "cachesvc.node.cli", "profile", "--producer", str(tmp_path / "base"),
                           "--consumer", str(tmp_path / "tuned"), "--data", str(data), "--out", str(out),
                           "--window-sizes", "1,2", "--dtype", "float32", "--target", server.address,
                           "--ttft-context", "512"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["prompts"] == 3 and doc["producer"] == "base" and doc["consumer"] == "tuned"
    assert doc["ttft_model"]["context_tokens"] == 512
    ttft = {r["plan"]: r["predicted_ttft_s"] for r in doc["plans"]}
    assert all(t > 0 for t in ttft.values()) and len(set(ttft.values())) > 1 and doc["ttft_model"]["prefill_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000
    printed = json.loads(proc.stdout)
    assert printed["frontier"][0]["plan"] == "full reuse"
    stored = client.get_profile("base", "tuned")
    assert stored.document["plans"] == doc["plans"] and stored.consumer_digest == weights_digest(tuned)
