"""``cachesvc bench reuse``: TTFT and quality of reuse on the real SmolLM2 pairs.

For each fine-tuned consumer and context length (512 … 4096 tokens of access-code
records), on held-out prompts (``--prompts-per-context`` per length, asked
``--questions-per-context`` at a time over one context), TTFT (prompt in, first token
out; models loaded) in four modes: ``full_prefill`` (the consumer alone), ``same_model``
(the consumer reusing its own stored prefix), ``full_reuse`` (the producer's KV, nothing
recomputed) and ``plan`` (the producer's KV with a plan of ``--plan``: one row per plan;
``profile`` takes the pair's profiled best plan), each with task quality and
``gain_retained`` over the producer alone, both with 95% bootstrap intervals, and
fidelity to the consumer's own prefill. A full prefill is timed once per context (the
later questions reuse its own cache of the context, cachesvc_lab.evaluate).

``--device cuda`` runs the models on a GPU (the loader moves slabs there under compute);
``--synthetic SHAPES`` times random-weight pairs at real models' shapes instead of the
real pairs (cachesvc_bench.synthetic): TTFT and fidelity only, where the real weights are not
at hand (a lent GPU machine) or too large for this host.

``--unaligned MODELS`` measures same-model reuse of real prompts instead (a context of
any length plus a question: cachesvc_bench.unaligned).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from cachesvc_bench import synthetic
from cachesvc_bench.ceilings import LoadCeiling
from cachesvc_bench.common import finish, machine, markdown_table, model_server, publish
from cachesvc_client import CacheClient, Kind
from cachesvc_connectors.hf.family import family_of
from cachesvc_lab.evaluate import BASE, REFERENCE, SAME, PairEvaluator, plan_name, summarize
from cachesvc_lab import finetune, smollm2, tasks
from cachesvc_connectors.reuse import Plan, ReuseProfile

def _plans(text: str, num_layers: int, profiles: Path, min_quality: float) -> dict[str, list[Plan]]:
    """Consumer -> its plans from ``CONSUMER=PLAN;...`` (``PLAN`` ``profile``: the profile's
    best plan reaching ``min_quality``)."""
    out: dict[str, list[Plan]] = {}
    for item in filter(None, text.split(";")):
        name, _, plan = (part.strip() for part in item.partition("="))
        out.setdefault(name, []).append(_profiled(name, profiles, min_quality) if plan == "profile"
                                        else Plan.parse(plan, num_layers))
    return out


def _profiled(name: str, profiles: Path, min_quality: float) -> Plan:
    path = profiles / f"profile-{name}.json"
    if not path.exists():
        raise SystemExit(f"{path} missing: run `cachesvc profile --producer smollm2 --consumer finetune:{name} "
                         f"--out {path} ...`, or give the plan (--plan '{name}=[20,24)')")
    profile = ReuseProfile.from_json(json.loads(path.read_text()))
    plan = profile.best_plan(min_quality)
    if plan is None:
        best = profile.best_row()
        print(f"{name}: no profiled plan reaches {min_quality}; taking the best, {best.plan.describe()} "
              f"({best.quality:.2f})")
        return best.plan
    return plan


def _rows(consumer: str, tokens: int, actual: int, plans: list[Plan], layers: int, results: dict, prompts: int,
          ceiling: LoadCeiling, with_quality: bool = True) -> list[dict]:
    """One row per mode (one per plan in mode ``plan``) from the evaluator's results at one
    length. ``load_gbps`` is the loader's rate (bytes over its own time) and
    ``load_ceiling_gbps`` the same bytes copied at best on the device, sampled right
    after each load (memcpy in slab pieces on a CPU, a pinned host-to-device copy on a
    GPU)."""
    summary = {r["variant"]: r for r in summarize(results)}
    modes = [(REFERENCE, "full_prefill", ""), (SAME, "same_model", ""),
             (plan_name(Plan.full_reuse(layers)), "full_reuse", "")]
    modes += [(plan_name(p), "plan", p.describe()) for p in plans if p.groups]
    full_ttft = summary[REFERENCE]["ttft_s"]
    rows = []
    for variant, mode, plan in modes:
        r = summary[variant]
        quality = {key: r[key] if with_quality else None
                   for key in ("quality", "quality_ci", "gain_retained", "gain_retained_ci")}
        rows.append({"consumer": consumer, "context_tokens": tokens, "actual_context_tokens": actual,
                     "mode": mode, "plan": plan,
                     "ttft_s": r["ttft_s"], "ttft_vs_full_prefill": round(r["ttft_s"] / full_ttft, 3),
                     **quality,
                     "base_quality": summary[BASE]["quality"] if with_quality else None,
                     "base_quality_ci": summary[BASE]["quality_ci"] if with_quality else None,
                     "fidelity": r["fidelity"],
                     "recomputed_layers": layers if mode == "full_prefill" else r["recomputed_layers"],
                     "bytes_fetched": r.get("bytes_fetched", 0),
                     "load_gbps": r.get("load_gbps"),
                     "load_ceiling_gbps": ceiling.gbps(r.get("bytes_fetched", 0)),
                     "hidden_fraction": r.get("hidden_fraction"),
                     "prompts": prompts, "timed_requests": len(results[variant].ttft_s)})
    return rows


def _slab_bytes(model, tokenizer) -> int:
    """Bytes of one 256-token K slab of ``model`` in bf16 (the piece a loader copies)."""
    return family_of(model, tokenizer).slab_bytes(Kind.K, 256)


def run(args: argparse.Namespace) -> dict:
    if args.synthetic:
        return run_synthetic(args)
    base, tokenizer = smollm2.load()
    base.to(args.device)
    layers = base.config.num_hidden_layers
    plans = _plans(args.plan, layers, Path(args.profiles), args.min_quality)
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    with model_server(args.device) as srv, CacheClient(srv.address) as client:
        for name in args.consumers.split(","):
            consumer, _ = smollm2.load(finetune.ensure([name])[name])
            consumer.to(args.device)
            measured = [Plan.full_reuse(layers)] + plans.get(name, [])
            ceiling = LoadCeiling(args.device, _slab_bytes(base, tokenizer))
            evaluator = PairEvaluator(client, base, consumer, tokenizer, smollm2.NAME, name,
                                      after_reuse=lambda report, c=ceiling: c.observe(report.bytes_fetched))
            for tokens in contexts:
                examples = tasks.sized_questions(tokenizer, "test", args.prompts_per_context,
                                                 args.questions_per_context, tokens, args.seed)
                actual = round(sum(len(tasks.context_ids(tokenizer, e)) for e in examples) / len(examples))
                with tqdm(total=len(examples), desc=f"reuse {name} @{tokens}", unit="prompt") as bar:
                    results = evaluator.run(examples, measured, same_model=True, progress=bar.update)
                rows += _rows(name, tokens, actual, measured[1:], layers, results, len(examples), ceiling)
    return {"benchmark": "reuse", "machine": _machine(args.device), "device": args.device,
            "producer": smollm2.NAME, "rows": rows}


def run_synthetic(args: argparse.Namespace) -> dict:
    """Random-weight pairs at real shapes: TTFT and fidelity (no task quality)."""
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    with model_server(args.device) as srv, CacheClient(srv.address) as client:
        for name in args.synthetic.split(","):
            shape = synthetic.SHAPES[name]
            producer, consumer, tokenizer = synthetic.pair(name, args.device)
            plans = [Plan(shape.layers, (synthetic.default_plan(shape),))]
            ceiling = LoadCeiling(args.device, _slab_bytes(producer, tokenizer))
            evaluator = PairEvaluator(client, producer, consumer, tokenizer, f"{name}-base", f"{name}-tuned",
                                      after_reuse=lambda report, c=ceiling: c.observe(report.bytes_fetched))
            rng = random.Random(args.seed)
            question = [rng.randrange(shape.vocab) for _ in range(16)]
            measured = [Plan.full_reuse(shape.layers)] + plans
            evaluator.run_ids([synthetic.random_sample(rng, 512, question, shape.vocab)],   # warm-up, not kept
                              measured, same_model=True)
            for tokens in contexts:
                samples = [synthetic.random_sample(rng, tokens, question, shape.vocab)
                           for _ in range(args.prompts_per_context)]
                with tqdm(total=len(samples), desc=f"reuse {name} @{tokens}", unit="prompt") as bar:
                    results = evaluator.run_ids(samples, measured, same_model=True, progress=bar.update)
                rows += _rows(name, tokens, tokens, plans, shape.layers, results, len(samples), ceiling,
                              with_quality=False)
            del producer, consumer, evaluator
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {"benchmark": "reuse", "machine": _machine(args.device), "device": args.device,
            "producer": "synthetic", "rows": rows}


def _machine(device: str) -> dict:
    facts = machine()
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def plot(doc: dict, path: Path) -> None:
    """Per consumer: TTFT by context length and mode (top) and, where the task is scored,
    exact match with its 95% interval (bottom, the producer alone dotted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    consumers = sorted({r["consumer"] for r in doc["rows"]})
    scored = any(r["quality"] is not None for r in doc["rows"])
    fig, axes = plt.subplots(2 if scored else 1, len(consumers), figsize=(6 * len(consumers), 8 if scored else 4.2),
                             squeeze=False)
    for column, name in enumerate(consumers):
        mine = [r for r in doc["rows"] if r["consumer"] == name]
        series = sorted({(r["mode"], r["plan"]) for r in mine})
        lengths = sorted({r["context_tokens"] for r in mine})
        for offset, (mode, plan) in enumerate(series):
            rows = [r for r in mine if (r["mode"], r["plan"]) == (mode, plan)]
            label = f"{mode} {plan}".strip()
            tokens = [r["context_tokens"] for r in rows]
            axes[0][column].plot(tokens, [r["ttft_s"] for r in rows], marker="o", label=label)
            if scored:
                # lengths as categories, the modes side by side within each
                shifted = [lengths.index(t) + 0.08 * (offset - (len(series) - 1) / 2) for t in tokens]
                axes[1][column].errorbar(shifted, [r["quality"] for r in rows], capsize=3, marker="o", label=label,
                                         yerr=[[r["quality"] - r["quality_ci"][0] for r in rows],
                                               [r["quality_ci"][1] - r["quality"] for r in rows]])
        axes[0][column].set(xlabel="context tokens", ylabel="TTFT (s)", title=f"{doc['producer']} -> {name}",
                            xscale="log")
        axes[0][column].legend(fontsize=8)
        if scored:
            base = sorted({(r["context_tokens"], r["base_quality"]) for r in mine})
            axes[1][column].plot([lengths.index(t) for t, _ in base], [q for _, q in base], ls=":", marker="x",
                                 color="gray", label="producer alone")
            axes[1][column].set(xlabel="context tokens", ylabel="exact match (95% CI)", ylim=(-0.05, 1.05),
                                xticks=range(len(lengths)), xticklabels=lengths, xlim=(-0.5, len(lengths) - 0.5),
                                title="task quality")
            axes[1][column].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    if args.unaligned:
        from cachesvc_bench import unaligned
        doc = unaligned.run(args)
        return finish(args.json, doc, unaligned.plot, *unaligned.table(doc))
    doc = run(args)
    png = publish(args.json, doc, plot)
    print(markdown_table(
        ["consumer", "context", "mode", "TTFT s", "× full", "exact [95% CI]", "gain retained [95% CI]",
         "identical", "KL", "recomputed", "MB fetched", "load GB/s", "ceiling GB/s", "hidden"],
        [[r["consumer"], r["context_tokens"], r["mode"] + (f" {r['plan']}" if r["plan"] else ""),
          r["ttft_s"], r["ttft_vs_full_prefill"],
          "-" if r["quality"] is None else f"{r['quality']:.2f} {r['quality_ci']}",
          "-" if r["quality"] is None else f"{r['gain_retained']:.2f} {r['gain_retained_ci']}",
          r["fidelity"]["identical"], r["fidelity"]["first_token_kl"],
          r["recomputed_layers"], round(r["bytes_fetched"] / 1e6, 1), r["load_gbps"], r["load_ceiling_gbps"],
          r["hidden_fraction"]]
         for r in doc["rows"]]))
    print(f"\nplot: {png}")
    return 0
