"""``cachesvc bench quality``: the quality harness for the real SmolLM2 pairs.

For each fine-tuned consumer (cachesvc_lab.finetune) with SmolLM2 as the
producer, on held-out access-code examples: the consumer's full prefill, the producer
alone, full reuse of the producer's KV, and single recompute groups at several depths
and sizes, each with task quality (exact match, 95% CI), ``gain_retained`` and fidelity
to the consumer's own prefill; plus the per-layer K/V/E deviation between the models.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from cachesvc_bench.common import bench_server, machine, markdown_table, publish
from cachesvc_client import CacheClient
from cachesvc_lab.evaluate import PairEvaluator, layer_deviation, summarize
from cachesvc_lab import finetune, smollm2, tasks
from cachesvc_connectors.reuse.plan import Plan

PRODUCER = smollm2.NAME


def run(args: argparse.Namespace) -> dict:
    base, tokenizer = smollm2.load()
    plans = [Plan.parse(p, base.config.num_hidden_layers) for p in args.plans.split(";")]
    examples = tasks.dataset("test", args.prompts, args.records, seed=args.seed)
    pairs = []
    with bench_server("--memory-bytes", "2GiB", "--disk-mode", "off") as srv, \
            CacheClient(srv.address) as client:
        for name in args.consumers.split(","):
            consumer, _ = smollm2.load(finetune.ensure([name])[name])
            evaluator = PairEvaluator(client, base, consumer, tokenizer, PRODUCER, name)
            t0 = time.perf_counter()
            with tqdm(total=len(examples), desc=f"quality {name}", unit="prompt") as bar:
                results = evaluator.run(examples, plans, progress=bar.update)
            deviation = layer_deviation(base, consumer, tasks.prompt_ids(tokenizer, examples[0]))
            pairs.append({"producer": PRODUCER, "consumer": name, "rows": summarize(results),
                          "layer_deviation": deviation, "seconds": round(time.perf_counter() - t0, 1),
                          "context_tokens": round(sum(len(tasks.context_ids(tokenizer, e))
                                                      for e in examples[:10]) / min(10, len(examples)))})
    return {"benchmark": "quality", "machine": machine(), "task": "access-code lookup",
            "prompts": args.prompts, "records": args.records, "pairs": pairs}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for pair in doc["pairs"]:
        rows = [r for r in pair["rows"] if r["variant"].startswith("plan:")]
        axes[0].errorbar([r["recomputed_layers"] for r in rows], [r["quality"] for r in rows],
                         yerr=[[r["quality"] - r["quality_ci"][0] for r in rows],
                               [r["quality_ci"][1] - r["quality"] for r in rows]],
                         fmt="o", capsize=3, label=pair["consumer"])
        for r in pair["rows"]:
            if r["variant"] in ("consumer", "producer"):
                axes[0].axhline(r["quality"], ls="--" if r["variant"] == "consumer" else ":", lw=1)
        axes[1].plot([d["layer"] for d in pair["layer_deviation"]], [d["K"] for d in pair["layer_deviation"]],
                     label=f"{pair['consumer']} K")
        axes[1].plot([d["layer"] for d in pair["layer_deviation"]], [d["E"] for d in pair["layer_deviation"]],
                     ls="--", label=f"{pair['consumer']} E")
    axes[0].set(xlabel="recomputed layers", ylabel="exact match", title="plans (dashed: consumer, dotted: producer)")
    axes[1].set(xlabel="layer", ylabel="relative deviation from the producer", title="K and E deviation")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> int:
    doc = run(args)
    png = publish(args.json, doc, plot)
    for pair in doc["pairs"]:
        print(f"\n{pair['producer']} -> {pair['consumer']} ({doc['prompts']} prompts, "
              f"~{pair['context_tokens']} context tokens)")
        print(markdown_table(
            ["variant", "recomputed", "exact match [95% CI]", "gain retained [95% CI]", "identical",
             "fidelity ES", "first-token KL", "TTFT s"],
            [[r["variant"], r["recomputed_layers"], f"{r['quality']:.3f} {r['quality_ci']}",
              f"{r['gain_retained']:.3f} {r['gain_retained_ci']}", r["fidelity"]["identical"],
              r["fidelity"]["edit_similarity"], r["fidelity"]["first_token_kl"], r["ttft_s"]]
             for r in pair["rows"]]))
    print(f"\nplot: {png}")
    return 0
