"""``cachesvc bench plan``: the profile's frontier plans and the baselines, measured, and
the planner's choices with their predicted against measured TTFT.

For each real pair with a profile (``cachesvc profile ... --out
bench-results/profile-<consumer>.json``) and each context length: every frontier plan
and the baselines (the consumer's full prefill, full reuse of the producer's K/V) on
held-out prompts, with task quality, ``gain_retained``, fidelity, measured TTFT and the
planner's predicted TTFT (per request). The cost model is calibrated before any
measurement: layer times on this host, load bandwidth from a timed fetch. Then the
planner's choice under three TTFT targets (fractions of the measured full prefill).
The CacheBlend-style baseline is not built yet; the JSON says so.
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
from cachesvc_connectors.evaluate import BASE, REFERENCE, PairEvaluator, plan_name, summarize
from cachesvc_connectors.hf.decoder import DecoderStack
from cachesvc_connectors.models import finetune, smollm2, tasks
from cachesvc_connectors.plan import profile_frontier
from cachesvc_connectors.planner import CostModel, choose


def _bandwidth(client: CacheClient, evaluator: PairEvaluator, tokenizer, tokens: int) -> float:
    """Bytes/s of a K/V fetch of every layer of a stored context (best of 3)."""
    example = tasks.sized_dataset(tokenizer, "profile", 1, tokens, seed=99)[0]
    context = tasks.context_ids(tokenizer, example)
    evaluator.producer.store(context)
    family = evaluator.producer.family_id
    hashes = client.hash_tokens(context, family)
    hit = client.lookup(family, hashes).best()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        slabs = client.get(family, hit, (Kind.K, Kind.V), as_torch=True)
        best = min(best, time.perf_counter() - t0)
    client.delete(family, chunk_hashes=hashes)
    return slabs.bytes_received / best


def run(args: argparse.Namespace) -> dict:
    base, tokenizer = smollm2.load()
    L = base.config.num_hidden_layers
    contexts = [int(c) for c in args.contexts.split(",")]
    fractions = [float(f) for f in args.targets.split(",")]
    chunk = 256
    rows, choices, pairs = [], [], []
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
            cost.bandwidth_Bps = _bandwidth(client, evaluator, tokenizer, max(contexts))
            pairs.append({"consumer": name, "cost_model": {k: v for k, v in vars(cost).items()},
                          "profile_prompts": document["prompts"]})
            plans = [plan for plan, _ in frontier]
            for tokens in contexts:
                examples = tasks.sized_dataset(tokenizer, "test", args.prompts_per_context, tokens, args.seed)
                shapes = []
                for e in examples:
                    context, prompt = tasks.context_ids(tokenizer, e), tasks.prompt_ids(tokenizer, e)
                    n = min(len(context) // chunk * chunk, len(prompt) - 1)
                    shapes.append((n, len(prompt) - 1 - n, len(prompt)))
                with tqdm(total=len(examples), desc=f"plan {name} @{tokens}", unit="prompt") as bar:
                    results = evaluator.run(examples, plans, progress=bar.update)
                summary = {r["variant"]: r for r in summarize(results)}
                variants = [(REFERENCE, None, "full prefill")] + \
                    [(plan_name(p), p, "full reuse" if not p.groups else "plan") for p in plans]
                measured_by_plan = {}
                for variant, plan, kind in variants:
                    r, per_request = summary[variant], results[variant].ttft_s
                    predicted = [cost.prefill_s(N) if plan is None else cost.predict(plan, n, s)
                                 for n, s, N in shapes]
                    errors = [abs(p - m) / m for p, m in zip(predicted, per_request, strict=True)]
                    row = {"consumer": name, "context_tokens": tokens, "plan": plan.describe() if plan else "prefill",
                           "kind": kind, "recomputed_layers": L if plan is None else plan.recomputed_layers,
                           "quality": r["quality"], "quality_ci": r["quality_ci"],
                           "base_quality": summary[BASE]["quality"], "gain_retained": r["gain_retained"],
                           "fidelity": r["fidelity"], "profile_quality": None if plan is None else
                           dict((p.describe(), q) for p, q in frontier)[plan.describe()],
                           "ttft_s": r["ttft_s"], "predicted_ttft_s": round(sorted(predicted)[len(predicted) // 2], 4),
                           "prediction_error_median": round(sorted(errors)[len(errors) // 2], 3),
                           "within_20pct": round(sum(e <= 0.2 for e in errors) / len(errors), 3),
                           "prompts": len(examples)}
                    rows.append(row)
                    measured_by_plan[row["plan"]] = row
                full = measured_by_plan["prefill"]["ttft_s"]
                n, s = shapes[0][0], shapes[0][1]
                for fraction in fractions:
                    target = fraction * full
                    choice = choose(frontier, cost, n, s, target)
                    label = choice.plan.describe() if choice.plan else "prefill"
                    got = measured_by_plan[label]
                    choices.append({"consumer": name, "context_tokens": tokens, "target_s": round(target, 4),
                                    "target_vs_full_prefill": fraction, "chosen": label,
                                    "predicted_ttft_s": round(choice.predicted_ttft_s, 4),
                                    "measured_ttft_s": got["ttft_s"], "met": got["ttft_s"] <= target,
                                    "quality": got["quality"], "gain_retained": got["gain_retained"],
                                    "why": choice.why})
    requests = [(r["within_20pct"], r["prompts"]) for r in rows]
    within = sum(w * n for w, n in requests) / sum(n for _, n in requests)
    return {"benchmark": "plan", "machine": machine(), "producer": smollm2.NAME, "pairs": pairs,
            "rows": rows, "choices": choices, "prediction_within_20pct": round(within, 3),
            "cacheblend_baseline": "not built yet (issue 5 item 5)"}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["consumer"], r["context_tokens"]) for r in doc["rows"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    for ax, (name, tokens) in zip(axes[0], keys, strict=True):
        rows = [r for r in doc["rows"] if r["consumer"] == name and r["context_tokens"] == tokens]
        for kind, marker in (("plan", "o"), ("full reuse", "s"), ("full prefill", "D")):
            sel = [r for r in rows if r["kind"] == kind]
            ax.scatter([r["ttft_s"] for r in sel], [r["gain_retained"] for r in sel], marker=marker, label=kind)
            for r in sel:
                ax.annotate(r["plan"], (r["ttft_s"], r["gain_retained"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        for c in doc["choices"]:
            if c["consumer"] == name and c["context_tokens"] == tokens:
                ax.axvline(c["target_s"], color="gray", ls=":", lw=0.8)
        ax.set(xlabel="measured TTFT (s)", ylabel="gain retained", title=f"{name} @ {tokens} tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    doc = run(args)
    png = publish(args.json, doc, plot)
    print(markdown_table(
        ["consumer", "context", "plan", "recomputed", "exact [95% CI]", "gain retained", "identical",
         "profile quality", "TTFT s", "predicted s", "median error", "within 20%"],
        [[r["consumer"], r["context_tokens"], r["plan"], r["recomputed_layers"],
          f"{r['quality']:.2f} {r['quality_ci']}", r["gain_retained"], r["fidelity"]["identical"],
          r["profile_quality"], r["ttft_s"], r["predicted_ttft_s"], r["prediction_error_median"],
          r["within_20pct"]] for r in doc["rows"]]))
    print()
    print(markdown_table(["consumer", "context", "target s", "chosen", "predicted s", "measured s", "met",
                          "gain retained"],
                         [[c["consumer"], c["context_tokens"], c["target_s"], c["chosen"], c["predicted_ttft_s"],
                           c["measured_ttft_s"], c["met"], c["gain_retained"]] for c in doc["choices"]]))
    print(f"\nrequests predicted within 20%: {doc['prediction_within_20pct']:.1%}\nplot: {png}")
    return 0
