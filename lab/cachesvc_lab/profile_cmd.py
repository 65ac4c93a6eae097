"""``cachesvc profile``: profile a (producer, consumer) pair of HF models and publish it.

    cachesvc profile --producer PATH --consumer PATH --data FILE [--out profile.json]
                     [--target HOST:PORT] [--prompts 50]

``--data`` is JSONL of {"context", "question", "answer"} (``python -m
cachesvc_lab.tasks FILE`` writes the repository's own); ``smollm2`` as a
model path means the real SmolLM2, and ``finetune:NAME`` one of the repository's
fine-tunes. Progress goes to stderr; ``--out`` gets the profile JSON, a PNG beside it,
and a ``.state.jsonl`` that makes a rerun resume. With ``--target`` both models are
registered there and the profile is stored in the service's registry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from cachesvc.wire.keys import DType

HELP = "profile a (producer, consumer) pair's reuse plans"
SUFFIX_TOKENS = 16    # the question after the cached context, in the TTFT prediction


def _load(spec: str):
    from cachesvc_lab import finetune, smollm2
    if spec == "smollm2":
        return smollm2.load(), smollm2.NAME
    if spec.startswith("finetune:"):
        name = spec.split(":", 1)[1]
        return smollm2.load(finetune.ensure([name])[name]), name
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).eval()
    return (model, AutoTokenizer.from_pretrained(spec)), Path(spec).name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--producer", required=True, help="producer model: HF path, 'smollm2' or 'finetune:NAME'")
    parser.add_argument("--consumer", required=True, help="consumer model (same family)")
    parser.add_argument("--data", required=True, help="JSONL of {context, question, answer}")
    parser.add_argument("--out", default="profile.json", help="profile JSON (state and plot beside it)")
    parser.add_argument("--prompts", type=int, default=50, help="prompts from --data to use")
    parser.add_argument("--producer-id", default="", help="model id in the service (default: from the path)")
    parser.add_argument("--consumer-id", default="")
    parser.add_argument("--window-sizes", default="1,2,3,4,6,8,10,12,15,20")
    parser.add_argument("--max-groups", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="slab dtype of the family (the producer's tensors are rounded through it)")
    parser.add_argument("--target", default="", help="store the profile in this cachesvc server")
    parser.add_argument("--ttft-context", type=int, default=4096,
                        help="predict each plan's TTFT at this many cached tokens (cost model "
                             "calibrated on this host; plotted)")
    parser.add_argument("--bandwidth", type=float, default=2e9,
                        help="data-plane bytes/s the TTFT prediction assumes")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cachesvc_connectors.hf.family import weights_digest
    from cachesvc_connectors.profiler import Profiler, ProfilerOptions, StateFile, measure
    from cachesvc_lab import tasks

    (producer, tokenizer), producer_name = _load(args.producer)
    (consumer, _), consumer_name = _load(args.consumer)
    producer_id, consumer_id = args.producer_id or producer_name, args.consumer_id or consumer_name
    examples = tasks.read_jsonl(args.data)[:args.prompts]
    if not examples:
        raise SystemExit(f"{args.data} holds no examples")
    samples = [(tasks.context_ids(tokenizer, e), tasks.prompt_ids(tokenizer, e)) for e in examples]
    dtype = {"bfloat16": DType.BFLOAT16, "float16": DType.FLOAT16, "float32": DType.FLOAT32}[args.dtype]
    options = ProfilerOptions(window_sizes=tuple(int(s) for s in args.window_sizes.split(",")),
                              max_groups=args.max_groups, dtype=dtype)
    digests = {"producer_digest": weights_digest(producer), "consumer_digest": weights_digest(consumer)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"producer": producer_id, "consumer": consumer_id, **digests, "data": str(args.data),
              "prompts": len(samples), "options": {"window_sizes": list(options.window_sizes),
                                                   "max_groups": options.max_groups, "dtype": args.dtype}}
    state = StateFile(out.with_suffix(".state.jsonl"), header)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            bars[phase] = tqdm(total=total, desc=f"profile {phase}", unit="prompt", file=sys.stderr)
        bar = bars[phase]
        bar.n = done
        bar.refresh()

    measured = measure(Profiler(producer, consumer, options), samples, state, progress)
    for bar in bars.values():
        bar.close()
    measured = dataclasses.replace(measured, producer=producer_id, consumer=consumer_id, data=str(args.data),
                                   **digests)
    measured = _predict_ttft(measured, consumer, tokenizer, dtype, args)
    document = measured.to_json()
    out.write_text(json.dumps(document, indent=1))
    plot(measured, out.with_suffix(".png"))
    if args.target:
        from cachesvc_client import CacheClient
        from cachesvc_connectors.hf.family import register
        with CacheClient(args.target) as client:
            register(client, producer, tokenizer, producer_id, dtype)
            register(client, consumer, tokenizer, consumer_id, dtype)
            version = client.put_profile(producer_id, consumer_id, digests["producer_digest"],
                                         digests["consumer_digest"], document)
        print(f"stored as version {version} of ({producer_id}, {consumer_id}) on {args.target}", file=sys.stderr)
    front = [r.to_json() for r in measured.plans if r.frontier]
    print(json.dumps({"producer": producer_id, "consumer": consumer_id, "prompts": measured.prompts,
                      "elapsed_s": measured.elapsed_s, "full_reuse_quality": measured.full_reuse_quality,
                      "frontier": [{k: p[k] for k in ("plan", "recomputed_layers", "quality", "quality_ci", "kl")}
                                   for p in front]}, indent=1))
    print(f"profile: {out}  plot: {out.with_suffix('.png')}", file=sys.stderr)
    return 0


def _predict_ttft(measured, consumer, tokenizer, dtype: DType, args: argparse.Namespace):
    """``measured`` with each plan's predicted TTFT at ``--ttft-context`` cached tokens and a
    short suffix, from a cost model calibrated on this host (hf.calibrate)."""
    from cachesvc_connectors.hf.calibrate import calibrate
    from cachesvc_connectors.hf.decoder import DecoderStack
    from cachesvc_connectors.hf.family import family_of
    from cachesvc_connectors.reuse import TtftSetting
    cost = calibrate(DecoderStack(consumer), family_of(consumer, tokenizer, dtype), bandwidth_Bps=args.bandwidth)
    n, s = args.ttft_context, SUFFIX_TOKENS
    predicted = {row.plan: round(cost.predict(row.plan, n, s), 4) for row in measured.plans}
    return measured.with_predictions(predicted, TtftSetting(n, s, round(cost.prefill_s(n + s + 1), 4),
                                                            dict(vars(cost))))


def plot(measured, path: Path) -> None:
    """Quality against recomputed layers and against predicted TTFT, and per-layer
    sensitivity, of a ``ReuseProfile``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.2))
    plans = measured.plans
    for multi, marker, label in ((False, "o", "single group"), (True, "s", "two or more groups")):
        rows = [r for r in plans if r.multi_group == multi]
        left.scatter([r.plan.recomputed_layers for r in rows], [r.quality for r in rows], marker=marker,
                     s=18, alpha=0.5, label=label)
    front = [r for r in plans if r.frontier]
    left.step([r.plan.recomputed_layers for r in front], [r.quality for r in front], where="post",
              color="black", label="frontier")
    for r in front:
        left.annotate(r.plan.describe(), (r.plan.recomputed_layers, r.quality), fontsize=7, xytext=(3, -9),
                      textcoords="offset points")
    left.set(xlabel="recomputed layers", ylabel="identical to consumer prefill",
             title=f"{measured.producer} -> {measured.consumer} ({measured.prompts} prompts)")
    left.legend(fontsize=8, loc="lower right")
    ttft = measured.ttft
    if ttft is not None:
        middle.scatter([r.predicted_ttft_s for r in plans], [r.quality for r in plans], s=14, alpha=0.4,
                       label="plans")
        middle.step([r.predicted_ttft_s for r in front], [r.quality for r in front], where="post",
                    color="black", label="frontier")
        middle.scatter([ttft.prefill_s], [1.0], marker="D", color="tab:red", label="full prefill")
        middle.set(xlabel=f"predicted TTFT (s) at {ttft.context_tokens} cached tokens",
                   ylabel="identical to consumer prefill", title="quality against predicted TTFT")
        middle.legend(fontsize=8, loc="lower right")
    sens = measured.layer_sensitivity
    right.bar([s.layer for s in sens], [s.kl for s in sens], color="tab:orange")
    right.axhline(next(r.kl for r in plans if r.plan.recomputed_layers == 0), color="gray", ls="--",
                  label="full reuse")
    right.set(xlabel="layer recomputed alone", ylabel="answer KL (nats)", title="per-layer sensitivity")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
