"""``cachesvc bench plan``: the profile's frontier plans and the baselines, measured, and
the planner's choices with their predicted against measured TTFT.

For each real pair with a profile (``cachesvc profile ... --out
bench-results/profile-<consumer>.json``) and each context length: every frontier plan
and the baselines (the consumer's full prefill, full reuse of the producer's K/V, and
CacheBlend-style selective token recompute at ``--blend``) on held-out prompts, with
``quality`` (the share of greedy answers identical to the consumer's own prefill, the
profile's measure), the task score ``task_exact`` and ``gain_retained`` over the producer
alone, each with its 95% bootstrap interval, measured TTFT and the planner's predicted
TTFT (per timed request: every reuse, and the full prefill once per context, since
``--questions-per-context`` questions share a context). The cost model is calibrated before any measurement, on samples never
measured: layer times on this host up to the longest context, the load bandwidth from
timed fetches, and the fixed and per-byte costs from a full prefill and two full reuses
(``CostModel.fit_fixed_costs``). Then the planner's choice under three TTFT targets
(fractions of the measured full prefill).

``--synthetic SHAPES`` (with ``--device cuda`` on a lent GPU machine) does the same for
random-weight pairs at real shapes, profiled in the run on random prompts: TTFT, the
planner and fidelity, no task quality.

Dominance. Quality is fidelity to the consumer's own prefill (identical greedy answers)
on the profile's own 50 prompts, measured in this run through the serving path for every
frontier plan and baseline alike (three or four held-out prompts per length would not
separate anything; the profile's own figures are kept beside as ``profile_quality``:
before issue 13 the serving path reused only the context's whole chunks). For each
baseline B and length, the planner, given those qualities, is asked twice: with B's
measured TTFT as the target (equal TTFT: is the plan it picks better?) and for the
fastest plan whose quality reaches B's (equal quality: is it faster?). B is dominated
when either answer is strictly better and no worse on the other axis (TTFT within 5%).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from cachesvc.wire.keys import Kind
from cachesvc_bench import synthetic
from cachesvc_bench.common import machine, markdown_table, model_server, publish
from cachesvc_client import CacheClient
from cachesvc_lab.evaluate import BASE, REFERENCE, PairEvaluator, blend_name, plan_name, summarize
from cachesvc_connectors.hf.decoder import DecoderStack
from cachesvc_lab import finetune, smollm2, tasks
from cachesvc_connectors.hf.calibrate import calibrate
from cachesvc_connectors.reuse import CostModel, Plan, ReuseProfile, blend_shares, choose
from cachesvc_connectors.profiler import Profiler, ProfilerOptions, StateFile, measure

TTFT_NOISE = 0.05
SYNTHETIC_WINDOWS = (1, 2, 4, 8, 12)   # a quicker search for the random-weight pairs


Sample = tuple[list[int], list[int], str]     # context ids, prompt ids (context first), answer


def _shapes(samples: list[Sample]) -> list[tuple[int, int, int]]:
    """Per sample (n cached tokens, s suffix tokens before the last, prompt tokens): the
    whole context is cached, its trailing partial chunk included (docs/chunk-keys.md)."""
    shapes = []
    for context, prompt, _ in samples:
        n = min(len(context), len(prompt) - 1)
        shapes.append((n, len(prompt) - 1 - n, len(prompt)))
    return shapes


@dataclass
class PairSetup:
    """One (producer, consumer) pair to measure: its models, its profile, the profile's
    prompts and held-out samples of a given context length."""

    name: str
    producer: object
    consumer: object
    tokenizer: object
    producer_id: str
    profile: ReuseProfile
    profile_samples: list[Sample]
    samples: Callable[[int], list[Sample]]
    probe: Callable[[int], Sample]           # one sample of a length, never measured (calibration)


def _sample(tokenizer, example: tasks.Example) -> Sample:
    return tasks.context_ids(tokenizer, example), tasks.prompt_ids(tokenizer, example), example.answer


def _real_pairs(args: argparse.Namespace) -> Iterator[PairSetup]:
    """SmolLM2 and its fine-tunes, with the profiles ``cachesvc profile`` wrote."""
    base, tokenizer = smollm2.load()
    base.to(args.device)
    for name in args.consumers.split(","):
        path = Path(args.profiles) / f"profile-{name}.json"
        if not path.exists():
            raise SystemExit(f"{path} missing: run `cachesvc profile --producer smollm2 "
                             f"--consumer finetune:{name} --out {path} ...` first")
        measured = ReuseProfile.from_json(json.loads(path.read_text()))
        if not measured.data:
            raise SystemExit(f"{path} does not name the data it was profiled on ('data'): profile again")
        consumer, _ = smollm2.load(finetune.ensure([name])[name])
        consumer.to(args.device)
        examples = tasks.read_jsonl(measured.data)[:measured.prompts]
        yield PairSetup(name, base, consumer, tokenizer, smollm2.NAME, measured,
                        [_sample(tokenizer, e) for e in examples],
                        lambda tokens: [_sample(tokenizer, e) for e in tasks.sized_questions(
                            tokenizer, "test", args.prompts_per_context, args.questions_per_context, tokens, args.seed)],
                        lambda tokens: _sample(tokenizer, tasks.sized_dataset(tokenizer, "profile", 1, tokens,
                                                                              seed=99)[0]))


def _synthetic_pairs(args: argparse.Namespace) -> Iterator[PairSetup]:
    """Random-weight pairs at real shapes (cachesvc_bench.synthetic), profiled here on random
    512-token prompts: TTFT, the planner and fidelity where the real weights are not at
    hand (a lent GPU machine). Task quality means nothing here."""
    import tempfile
    for name in args.synthetic.split(","):
        shape = synthetic.SHAPES[name]
        producer, consumer, tokenizer = synthetic.pair(name, args.device)
        rng = random.Random(args.seed)
        question = [rng.randrange(shape.vocab) for _ in range(16)]
        profile_samples = [synthetic.random_sample(rng, 512, question, shape.vocab)
                           for _ in range(args.profile_prompts)]
        with tempfile.TemporaryDirectory() as tmp:
            measured = measure(Profiler(producer, consumer, ProfilerOptions(window_sizes=SYNTHETIC_WINDOWS)),
                               [(c, p) for c, p, _ in profile_samples],
                               StateFile(Path(tmp) / "state.jsonl", {"synthetic": name}))
        yield PairSetup(name, producer, consumer, tokenizer, f"{name}-base", measured, profile_samples,
                        lambda tokens, rng=rng, question=question, vocab=shape.vocab: [
                            synthetic.random_sample(rng, tokens, question, vocab)
                            for _ in range(args.prompts_per_context)],
                        lambda tokens, question=question, vocab=shape.vocab: synthetic.random_sample(
                            random.Random(args.seed + 99), tokens, question, vocab))


def _calibrate_requests(client: CacheClient, evaluator: PairEvaluator, cost: CostModel, small: Sample,
                        large: Sample, repeats: int = 3) -> None:
    """Before anything is measured, on samples never measured: the load bandwidth (a K/V
    fetch of every layer of ``large``), and the cost model's fixed and per-byte costs
    fitted to a full prefill of ``small`` and full reuses of both (best of ``repeats``)."""
    reuse = evaluator.consumer(Plan.full_reuse(cost.num_layers), evaluator.producer.model_id)
    family = evaluator.producer.family_id
    timed = []
    for context, prompt, _ in (small, large):
        evaluator.producer.store(context)
        timed.append(min(evaluator.reuse(reuse, prompt).ttft_s for _ in range(repeats)))
    hashes = client.hash_tokens(large[0], family)
    hit = client.lookup(family, hashes).best()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        slabs = client.get(family, hit, (Kind.K, Kind.V), as_torch=True)
        best = min(best, time.perf_counter() - t0)
    cost.bandwidth_Bps = slabs.bytes_received / best
    prefill_s = min(evaluator.full_prefill(evaluator.consumer_model, small[1]).ttft_s for _ in range(repeats))
    (n, s, tokens), (n2, s2, _) = _shapes([small, large])
    cost.fit_fixed_costs((tokens, prefill_s), (n, s, timed[0]), (n2, s2, timed[1]))
    for context, _, _ in (small, large):
        evaluator.client.delete(family, chunk_hashes=evaluator.client.hash_tokens(context, family,
                                                                                  include_partial=True))


def _predicted(cost: CostModel, what: Plan | float | None, n: int, s: int, prompt_tokens: int) -> float:
    """The cost model's TTFT for a request: a full prefill (None), a plan, or a blend ratio."""
    if what is None:
        return cost.prefill_s(prompt_tokens)
    return cost.predict(what, n, s) if isinstance(what, Plan) else cost.predict_blend(what, n, s)


def _profile_prompts(evaluator: PairEvaluator, pair: PairSetup, frontier, blends) -> dict:
    """Every frontier plan and the baselines on the profile's own prompts, through the
    serving path: identical-answer rates measured alike for all."""
    with tqdm(total=len(pair.profile_samples), desc=f"quality {pair.name} @profile prompts", unit="prompt") as bar:
        results = evaluator.run_ids(pair.profile_samples, [p for p, _ in frontier], progress=bar.update,
                                    blends=blends)
    summary = {r["variant"]: r for r in summarize(results)}
    return {"prompts": len(pair.profile_samples),
            "identical": {v: summary[v]["fidelity"]["identical"] for v in summary if v not in (REFERENCE, BASE)},
            "profile_says": {plan_name(p): q for p, q in frontier}}


def _dominance(name: str, tokens: int, measured: dict, frontier, cost: CostModel, n: int, s: int,
               baselines: dict[str, tuple[float, float]]) -> list[dict]:
    """For each baseline (label -> (quality, measured TTFT)): the planner's plan at the
    baseline's TTFT and at its quality, and whether either dominates it. ``frontier``
    holds the plans with their qualities measured like the baselines'."""
    quality_of = dict((p.describe(), q) for p, q in frontier) | {"prefill": 1.0}
    out = []
    for label, (quality, ttft) in baselines.items():
        at_ttft = choose(frontier, cost, n, s, ttft)
        at_ttft_label = at_ttft.plan.describe() if at_ttft.plan else "prefill"
        at_quality = choose([(p, q) for p, q in frontier if q >= quality], cost, n, s, None)
        at_quality_label = at_quality.plan.describe() if at_quality.plan else "prefill"
        a = (quality_of[at_ttft_label], measured[at_ttft_label]["ttft_s"])
        b = (quality_of[at_quality_label], measured[at_quality_label]["ttft_s"])
        better_at_ttft = a[0] > quality and a[1] <= ttft * (1 + TTFT_NOISE)
        faster_at_quality = b[1] < ttft * (1 - TTFT_NOISE) and b[0] >= quality
        verdict = "dominated" if better_at_ttft or faster_at_quality else "not dominated"
        why = (f"at its TTFT ({ttft:.2f} s) the planner picks {at_ttft_label}: quality {a[0]:.2f} vs "
               f"{quality:.2f}, {a[1]:.2f} s; at its quality the fastest plan is {at_quality_label}: "
               f"{b[1]:.2f} s, quality {b[0]:.2f}")
        out.append({"consumer": name, "context_tokens": tokens, "baseline": label, "baseline_quality": quality,
                    "baseline_ttft_s": ttft, "plan_at_equal_ttft": at_ttft_label,
                    "plan_at_equal_ttft_quality": a[0], "plan_at_equal_ttft_ttft_s": a[1],
                    "plan_at_equal_quality": at_quality_label, "plan_at_equal_quality_quality": b[0],
                    "plan_at_equal_quality_ttft_s": b[1], "verdict": verdict, "why": why})
    return out


class Variant(NamedTuple):
    name: str                       # the evaluator's result key
    label: str                      # the row's "plan"
    kind: str                       # "full prefill", "full reuse", "plan" or "cacheblend"
    recomputed: float               # layers, or their equivalent for a blend
    quality: float                  # on the profile's prompts, through the serving path
    what: Plan | float | None       # what runs: None = prefill, a plan, or a blend ratio


def _variants(frontier, blends: list[float], on_profile: dict, L: int) -> list[Variant]:
    identical = on_profile["identical"]
    out = [Variant(REFERENCE, "prefill", "full prefill", L, 1.0, None)]
    out += [Variant(plan_name(p), p.describe(), "full reuse" if not p.groups else "plan", p.recomputed_layers,
                    identical[plan_name(p)], p) for p, _ in frontier]
    for r in blends:
        first, rest = blend_shares(r)
        out.append(Variant(blend_name(r), f"cacheblend {r:.0%}", "cacheblend", round(1 + first + (L - 2) * rest, 1),
                           identical[blend_name(r)], r))
    return out


def _rows(name: str, tokens: int, variants: list[Variant], results: dict, shapes, cost: CostModel,
          frontier) -> dict[str, dict]:
    """One row per variant at one length, by label, with per-request predicted TTFTs."""
    summary = {r["variant"]: r for r in summarize(results)}
    profiled = {p.describe(): q for p, q in frontier}
    rows = {}
    for variant, label, kind, recomputed, profile_quality, what in variants:
        r, per_request = summary[variant], results[variant].ttft_s
        timed = [shapes[i] for i in results[variant].timed]     # a full prefill: once per context
        predicted = [_predicted(cost, what, *shape) for shape in timed]
        errors = [abs(p - m) / m for p, m in zip(predicted, per_request, strict=True)]
        rows[label] = {
            "consumer": name, "context_tokens": tokens, "plan": label, "kind": kind,
            "recomputed_layers": recomputed, "quality": r["fidelity"]["identical"],
            "task_exact": r["quality"], "task_exact_ci": r["quality_ci"],
            "base_task_exact": summary[BASE]["quality"], "base_task_exact_ci": summary[BASE]["quality_ci"],
            "gain_retained": r["gain_retained"], "gain_retained_ci": r["gain_retained_ci"],
            "fidelity": r["fidelity"], "quality_on_profile_prompts": profile_quality,
            "profile_quality": profiled.get(label),
            "ttft_s": r["ttft_s"], "predicted_ttft_s": round(sorted(predicted)[len(predicted) // 2], 4),
            "prediction_error_median": round(sorted(errors)[len(errors) // 2], 3),
            "within_20pct": round(sum(e <= 0.2 for e in errors) / len(errors), 3), "prompts": len(shapes),
            "requests": [{"n": n, "s": s, "measured_s": round(m, 4), "predicted_s": round(p, 4)}
                         for (n, s, _), m, p in zip(timed, per_request, predicted, strict=True)]}
    return rows


def _choices(name: str, tokens: int, measured: dict, frontier, cost: CostModel, n: int, s: int,
             fractions: list[float]) -> list[dict]:
    """The planner's choice under each target (a fraction of the measured prefill)."""
    out = []
    for fraction in fractions:
        target = fraction * measured["prefill"]["ttft_s"]
        choice = choose(frontier, cost, n, s, target)
        got = measured[choice.plan.describe() if choice.plan else "prefill"]
        out.append({"consumer": name, "context_tokens": tokens, "target_s": round(target, 4),
                    "target_vs_full_prefill": fraction, "chosen": got["plan"],
                    "predicted_ttft_s": round(choice.predicted_ttft_s, 4), "measured_ttft_s": got["ttft_s"],
                    "met": got["ttft_s"] <= target, "quality": got["quality"],
                    "quality_on_profile_prompts": got["quality_on_profile_prompts"], "why": choice.why})
    return out


def run(args: argparse.Namespace) -> dict:
    contexts = [int(c) for c in args.contexts.split(",")]
    fractions = [float(f) for f in args.targets.split(",")]
    blends = [float(b) for b in args.blend.split(",") if b]
    rows, choices, pairs, dominance = [], [], [], []
    with model_server(args.device) as srv, CacheClient(srv.address) as client:
        for pair in (_synthetic_pairs(args) if args.synthetic else _real_pairs(args)):
            name, L = pair.name, pair.profile.num_layers
            frontier = pair.profile.frontier()
            evaluator = PairEvaluator(client, pair.producer, pair.consumer, pair.tokenizer, pair.producer_id, name)
            cost = calibrate(DecoderStack(pair.consumer), evaluator.producer.registration.family,
                                       sizes=tuple(sorted({16, 128, 512, 1024, *contexts})))
            _calibrate_requests(client, evaluator, cost, pair.probe(512), pair.probe(max(contexts)))
            on_profile = _profile_prompts(evaluator, pair, frontier, blends)
            pairs.append({"consumer": name, "cost_model": dict(vars(cost)), "profile_prompts": pair.profile.prompts,
                          "quality_on_profile_prompts": on_profile,
                          "frontier": [{"plan": p.describe(), "quality": q} for p, q in frontier]})
            variants = _variants(frontier, blends, on_profile, L)
            for tokens in contexts:
                samples = pair.samples(tokens)
                shapes = _shapes(samples)
                with tqdm(total=len(samples), desc=f"plan {name} @{tokens}", unit="prompt") as bar:
                    results = evaluator.run_ids(samples, [p for p, _ in frontier], progress=bar.update, blends=blends)
                measured = _rows(name, tokens, variants, results, shapes, cost, frontier)
                rows += measured.values()
                n, s = shapes[0][0], shapes[0][1]
                choices += _choices(name, tokens, measured, frontier, cost, n, s, fractions)
                baselines = {label: (row["quality_on_profile_prompts"], row["ttft_s"])
                             for label, row in measured.items() if row["kind"] in ("full reuse", "cacheblend")}
                as_measured = [(p, measured[p.describe()]["quality_on_profile_prompts"]) for p, _ in frontier]
                dominance += _dominance(name, tokens, measured, as_measured, cost, n, s, baselines)
    requests = [(r["within_20pct"], len(r["requests"])) for r in rows]
    within = sum(w * n for w, n in requests) / sum(n for _, n in requests)
    facts = machine()
    if args.device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return {"benchmark": "plan", "machine": facts, "device": args.device,
            "producer": "synthetic" if args.synthetic else smollm2.NAME, "pairs": pairs,
            "rows": rows, "choices": choices, "dominance": dominance,
            "prediction_within_20pct": round(within, 3)}


def plot(doc: dict, path: Path) -> None:
    """Per pair and length: quality on the profile's prompts against measured TTFT (the
    Pareto view the dominance verdicts read), targets as dotted lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["consumer"], r["context_tokens"]) for r in doc["rows"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    for ax, (name, tokens) in zip(axes[0], keys, strict=True):
        rows = [r for r in doc["rows"] if r["consumer"] == name and r["context_tokens"] == tokens]
        for kind, marker in (("plan", "o"), ("full reuse", "s"), ("full prefill", "D"), ("cacheblend", "^")):
            sel = [(r, r["quality_on_profile_prompts"]) for r in rows if r["kind"] == kind]
            ax.scatter([r["ttft_s"] for r, _ in sel], [q for _, q in sel], marker=marker, label=kind)
            for r, q in sel:
                ax.annotate(r["plan"], (r["ttft_s"], q), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for c in doc["choices"]:
            if c["consumer"] == name and c["context_tokens"] == tokens:
                ax.axvline(c["target_s"], color="gray", ls=":", lw=0.8)
        ax.set(xlabel="measured TTFT (s)", ylabel="identical to consumer prefill (profile prompts)",
               title=f"{name} @ {tokens} tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    doc = run(args)
    png = publish(args.json, doc, plot)
    print(markdown_table(
        ["consumer", "context", "plan", "recomputed", "identical", "quality (profile prompts)",
         "task exact [95% CI]", "gain retained [95% CI]", "TTFT s", "predicted s", "median error", "within 20%"],
        [[r["consumer"], r["context_tokens"], r["plan"], r["recomputed_layers"], r["quality"],
          r["quality_on_profile_prompts"], f"{r['task_exact']:.2f} {r['task_exact_ci']}",
          f"{r['gain_retained']:.2f} {r['gain_retained_ci']}", r["ttft_s"],
          r["predicted_ttft_s"], r["prediction_error_median"], r["within_20pct"]] for r in doc["rows"]]))
    print()
    print(markdown_table(["consumer", "context", "target s", "chosen", "predicted s", "measured s", "met",
                          "quality (profile prompts)"],
                         [[c["consumer"], c["context_tokens"], c["target_s"], c["chosen"], c["predicted_ttft_s"],
                           c["measured_ttft_s"], c["met"], c["quality_on_profile_prompts"]] for c in doc["choices"]]))
    print()
    print(markdown_table(["consumer", "context", "baseline", "quality", "TTFT s", "at its TTFT", "at its quality",
                          "verdict"],
                         [[d["consumer"], d["context_tokens"], d["baseline"], d["baseline_quality"],
                           d["baseline_ttft_s"],
                           f"{d['plan_at_equal_ttft']} ({d['plan_at_equal_ttft_quality']:.2f}, "
                           f"{d['plan_at_equal_ttft_ttft_s']:.2f} s)",
                           f"{d['plan_at_equal_quality']} ({d['plan_at_equal_quality_quality']:.2f}, "
                           f"{d['plan_at_equal_quality_ttft_s']:.2f} s)", d["verdict"]] for d in doc["dominance"]]))
    print(f"\nrequests predicted within 20%: {doc['prediction_within_20pct']:.1%}\nplot: {png}")
    return 0
