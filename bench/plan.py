"""``cachesvc bench plan``: the profile's frontier plans and the baselines, measured, and
the planner's choices with their predicted against measured TTFT.

For each real pair with a profile (``cachesvc profile ... --out
bench-results/profile-<consumer>.json``) and each context length: every frontier plan
and the baselines (the consumer's full prefill, full reuse of the producer's K/V, and
CacheBlend-style selective token recompute at ``--blend``) on held-out prompts, with task
quality, ``gain_retained``, fidelity, measured TTFT and the planner's predicted TTFT (per
request). The cost model is calibrated before any measurement: layer times on this host,
load bandwidth and fixed fetch cost from timed fetches. Then the planner's choice under
three TTFT targets (fractions of the measured full prefill).

Dominance. Quality is fidelity to the consumer's own prefill (identical greedy answers),
on the profile's own prompts: the profile measured every frontier plan there, and this
benchmark measures the baselines on the same prompts (and full reuse and the planner's
default plan again, as a check that the two harnesses agree). Three or four held-out
prompts per length would not separate anything. For each baseline B and length, the
planner is asked twice: with B's measured TTFT as the target (equal TTFT: is the plan it
picks better?) and for the fastest plan whose profiled quality reaches B's (equal
quality: is it faster?). B is dominated when either answer is strictly better and no
worse on the other axis (TTFT within 5%, the run-to-run noise here).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from cachesvc.keys import Kind
from cachesvc_bench.common import bench_server, machine, markdown_table, publish
from cachesvc_client import CacheClient
from cachesvc_connectors.evaluate import BASE, REFERENCE, PairEvaluator, blend_name, plan_name, summarize
from cachesvc_connectors.hf.decoder import DecoderStack
from cachesvc_connectors.models import finetune, smollm2, tasks
from cachesvc_connectors.plan import Plan, best_plan, profile_frontier
from cachesvc_connectors.planner import CostModel, choose

TTFT_NOISE = 0.05


def _data_plane(client: CacheClient, evaluator: PairEvaluator, tokenizer, tokens: int) -> tuple[float, float]:
    """Bytes/s of a K/V fetch of every layer of a stored context, and the fixed cost of a
    lookup plus a fetch of its first chunk beyond its bytes (best of 3 each)."""
    example = tasks.sized_dataset(tokenizer, "profile", 1, tokens, seed=99)[0]
    context = tasks.context_ids(tokenizer, example)
    evaluator.producer.store(context)
    family = evaluator.producer.family_id
    hashes = client.hash_tokens(context, family)
    hit = client.lookup(family, hashes).best()
    best, first = float("inf"), float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        slabs = client.get(family, hit, (Kind.K, Kind.V), as_torch=True)
        best = min(best, time.perf_counter() - t0)
    bandwidth = slabs.bytes_received / best
    for _ in range(3):
        t0 = time.perf_counter()
        one = client.get(family, client.lookup(family, hashes).best()[:1], (Kind.K, Kind.V), as_torch=True)
        first = min(first, time.perf_counter() - t0 - one.bytes_received / bandwidth)
    client.delete(family, chunk_hashes=hashes)
    return bandwidth, max(first, 0.0)


def _shapes(tokenizer, examples, chunk: int) -> list[tuple[int, int, int]]:
    """Per example (n cached tokens, s suffix tokens before the last, prompt tokens)."""
    shapes = []
    for e in examples:
        context, prompt = tasks.context_ids(tokenizer, e), tasks.prompt_ids(tokenizer, e)
        n = min(len(context) // chunk * chunk, len(prompt) - 1)
        shapes.append((n, len(prompt) - 1 - n, len(prompt)))
    return shapes


def _predicted(cost: CostModel, what: Plan | float | None, n: int, s: int, prompt_tokens: int) -> float:
    """The cost model's TTFT for a request: a full prefill (None), a plan, or a blend ratio."""
    if what is None:
        return cost.prefill_s(prompt_tokens)
    return cost.predict(what, n, s) if isinstance(what, Plan) else cost.predict_blend(what, n, s)


def _profile_prompts(evaluator: PairEvaluator, document: dict, frontier, blends, name: str) -> dict:
    """The baselines (and full reuse and the default plan, as a check) on the profile's
    own prompts: identical-answer rates comparable with the profile's."""
    examples = tasks.read_jsonl(document["data"])[:document["prompts"]]
    L = document["num_layers"]
    default = best_plan(document, 0.95)
    plans = [Plan.full_reuse(L)] + ([default] if default is not None and default.groups else [])
    with tqdm(total=len(examples), desc=f"baselines {name} @profile prompts", unit="prompt") as bar:
        results = evaluator.run(examples, plans, progress=bar.update, blends=blends)
    summary = {r["variant"]: r for r in summarize(results)}
    profiled = dict((p.describe(), q) for p, q in frontier)
    return {"prompts": len(examples), "data": document["data"],
            "identical": {v: summary[v]["fidelity"]["identical"] for v in summary if v not in (REFERENCE, BASE)},
            "profile_says": {plan_name(p): profiled.get(p.describe()) for p in plans}}


def _dominance(name: str, tokens: int, measured: dict, frontier, cost: CostModel, n: int, s: int,
               baselines: dict[str, tuple[float, float]]) -> list[dict]:
    """For each baseline (label -> (quality, measured TTFT)): the planner's plan at the
    baseline's TTFT and at its quality, and whether either dominates it."""
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


def run(args: argparse.Namespace) -> dict:
    base, tokenizer = smollm2.load()
    L = base.config.num_hidden_layers
    contexts = [int(c) for c in args.contexts.split(",")]
    fractions = [float(f) for f in args.targets.split(",")]
    blends = [float(b) for b in args.blend.split(",") if b]
    chunk = 256
    rows, choices, pairs, dominance = [], [], [], []
    with bench_server("--memory-bytes", "2GiB", "--disk-mode", "off") as srv, \
            CacheClient(srv.address) as client:
        for name in args.consumers.split(","):
            path = Path(args.profiles) / f"profile-{name}.json"
            if not path.exists():
                raise SystemExit(f"{path} missing: run `cachesvc profile --producer smollm2 "
                                 f"--consumer finetune:{name} --out {path} ...` first")
            document = json.loads(path.read_text())
            frontier = profile_frontier(document)
            consumer, _ = smollm2.load(finetune.ensure([name])[name])
            evaluator = PairEvaluator(client, base, consumer, tokenizer, smollm2.NAME, name)
            cost = CostModel.calibrate(DecoderStack(consumer), evaluator.producer.registration.family)
            cost.bandwidth_Bps, cost.fetch_overhead_s = _data_plane(client, evaluator, tokenizer, max(contexts))
            on_profile = _profile_prompts(evaluator, document, frontier, blends, name)
            pairs.append({"consumer": name, "cost_model": dict(vars(cost)), "profile_prompts": document["prompts"],
                          "baselines_on_profile_prompts": on_profile})
            plans = [plan for plan, _ in frontier]
            for tokens in contexts:
                examples = tasks.sized_dataset(tokenizer, "test", args.prompts_per_context, tokens, args.seed)
                shapes = _shapes(tokenizer, examples, chunk)
                with tqdm(total=len(examples), desc=f"plan {name} @{tokens}", unit="prompt") as bar:
                    results = evaluator.run(examples, plans, progress=bar.update, blends=blends)
                summary = {r["variant"]: r for r in summarize(results)}
                # (variant, label, kind, recomputed layers or their equivalent, quality on the
                # profile's prompts, what runs: None = prefill, a plan, or a blend ratio)
                variants = [(REFERENCE, "prefill", "full prefill", L, 1.0, None)]
                variants += [(plan_name(p), p.describe(), "full reuse" if not p.groups else "plan",
                              p.recomputed_layers, q, p) for p, q in frontier]
                variants += [(blend_name(r), f"cacheblend {r:.0%}", "cacheblend",
                              round(1 + min(1.0, 2 * r) + (L - 2) * r, 1), on_profile["identical"][blend_name(r)], r)
                             for r in blends]
                measured = {}
                for variant, label, kind, recomputed, profile_quality, what in variants:
                    r, per_request = summary[variant], results[variant].ttft_s
                    predicted = [_predicted(cost, what, *shape) for shape in shapes]
                    errors = [abs(p - m) / m for p, m in zip(predicted, per_request, strict=True)]
                    row = {"consumer": name, "context_tokens": tokens, "plan": label, "kind": kind,
                           "recomputed_layers": recomputed,
                           "quality": r["quality"], "quality_ci": r["quality_ci"],
                           "base_quality": summary[BASE]["quality"], "gain_retained": r["gain_retained"],
                           "fidelity": r["fidelity"], "quality_on_profile_prompts": profile_quality,
                           "ttft_s": r["ttft_s"], "predicted_ttft_s": round(sorted(predicted)[len(predicted) // 2], 4),
                           "prediction_error_median": round(sorted(errors)[len(errors) // 2], 3),
                           "within_20pct": round(sum(e <= 0.2 for e in errors) / len(errors), 3),
                           "prompts": len(examples),
                           "requests": [{"n": n, "s": s, "measured_s": round(m, 4), "predicted_s": round(p, 4)}
                                        for (n, s, _), m, p in zip(shapes, per_request, predicted, strict=True)]}
                    rows.append(row)
                    measured[label] = row
                full = measured["prefill"]["ttft_s"]
                n, s = shapes[0][0], shapes[0][1]
                for fraction in fractions:
                    target = fraction * full
                    choice = choose(frontier, cost, n, s, target)
                    label = choice.plan.describe() if choice.plan else "prefill"
                    got = measured[label]
                    choices.append({"consumer": name, "context_tokens": tokens, "target_s": round(target, 4),
                                    "target_vs_full_prefill": fraction, "chosen": label,
                                    "predicted_ttft_s": round(choice.predicted_ttft_s, 4),
                                    "measured_ttft_s": got["ttft_s"], "met": got["ttft_s"] <= target,
                                    "quality": got["quality"], "gain_retained": got["gain_retained"],
                                    "why": choice.why})
                identical = on_profile["identical"]
                baselines = {"full reuse": (identical[plan_name(Plan.full_reuse(L))], measured["full reuse"]["ttft_s"])}
                baselines |= {f"cacheblend {r:.0%}": (identical[blend_name(r)], measured[f"cacheblend {r:.0%}"]["ttft_s"])
                              for r in blends}
                dominance += _dominance(name, tokens, measured, frontier, cost, n, s, baselines)
    requests = [(r["within_20pct"], r["prompts"]) for r in rows]
    within = sum(w * n for w, n in requests) / sum(n for _, n in requests)
    return {"benchmark": "plan", "machine": machine(), "producer": smollm2.NAME, "pairs": pairs,
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
        ["consumer", "context", "plan", "recomputed", "exact [95% CI]", "gain retained", "identical",
         "quality (profile prompts)", "TTFT s", "predicted s", "median error", "within 20%"],
        [[r["consumer"], r["context_tokens"], r["plan"], r["recomputed_layers"],
          f"{r['quality']:.2f} {r['quality_ci']}", r["gain_retained"], r["fidelity"]["identical"],
          r["quality_on_profile_prompts"], r["ttft_s"], r["predicted_ttft_s"], r["prediction_error_median"],
          r["within_20pct"]] for r in doc["rows"]]))
    print()
    print(markdown_table(["consumer", "context", "target s", "chosen", "predicted s", "measured s", "met",
                          "gain retained"],
                         [[c["consumer"], c["context_tokens"], c["target_s"], c["chosen"], c["predicted_ttft_s"],
                           c["measured_ttft_s"], c["met"], c["gain_retained"]] for c in doc["choices"]]))
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
