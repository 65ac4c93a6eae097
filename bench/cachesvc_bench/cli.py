"""``cachesvc bench``: the benchmarks, registered as a ``cachesvc`` subcommand through the
``cachesvc.commands`` entry point. Importing this module is cheap (argparse only): each
benchmark is imported when it runs."""

from __future__ import annotations

import argparse
import importlib

HELP = "run a benchmark (JSON + markdown table + plot)"
BENCHMARKS = ("lookup", "dataplane", "quality", "reuse", "plan", "overhead", "soak", "vllm", "cluster", "agents")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bench", choices=BENCHMARKS)
    parser.add_argument("--json", required=True, help="write the JSON result here")
    parser.add_argument("--entries", type=int, default=100_000, help="lookup: index size")
    parser.add_argument("--batch", type=int, default=1024, help="lookup: hashes per batched lookup")
    parser.add_argument("--rounds", type=int, default=300, help="lookup: timed batched lookups")
    parser.add_argument("--paths", default="", help="dataplane: paths to measure (default: "
                        "grpc,tcp,shm, and ucx when ucxx is installed)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="dataplane: timed rounds (best kept; each GET in turns with its ceiling)")
    parser.add_argument("--vllm-python", default=".vllm/venv/bin/python",
                        help="vllm: the python of vLLM's virtualenv (make vllm-venv)")
    parser.add_argument("--lmcache-python", default=".lmcache/venv/bin/python",
                        help="dataplane: python of LMCache's virtualenv (make lmcache-venv)")
    parser.add_argument("--consumers", default="codes-upper,codes-all",
                        help="quality, reuse, plan: fine-tuned consumers of SmolLM2")
    parser.add_argument("--prompts", type=int, default=100, help="quality: held-out prompts per pair; "
                        "reuse: prompts per context length")
    parser.add_argument("--records", type=int, default=25, help="quality: records per context")
    parser.add_argument("--seed", type=int, default=0, help="quality, reuse: data seed")
    parser.add_argument("--plans", default="none;[0,2);[10,12);[20,22);[28,30);[20,24);[20,26);"
                        "[10,20);[20,30);[15,30)", help="quality: plans, ';'-separated (single "
                        "groups at several depths and sizes; 'none' is full reuse)")
    parser.add_argument("--plan", default="codes-upper=profile;codes-all=profile",
                        help="reuse: plans measured in mode 'plan', 'CONSUMER=PLAN' items ';'-separated "
                        "(several per consumer allowed); PLAN 'profile' takes the profile's best plan "
                        "(fewest layers at quality >= --min-quality, from --profiles)")
    parser.add_argument("--min-quality", type=float, default=0.95,
                        help="reuse: the quality a profile's best plan must reach")
    parser.add_argument("--prompts-per-context", type=int, default=60,
                        help="reuse, plan: prompts per context length (60 puts a 95%% interval at about "
                        "±0.09 near 0.85, so plans 0.2 apart separate)")
    parser.add_argument("--questions-per-context", type=int, default=6,
                        help="reuse, plan: questions asked over each context (one prefill per model per context)")
    parser.add_argument("--contexts", default="512,1024,2048,4096",
                        help="reuse, plan, overhead: context lengths (plan: use 1024,4096)")
    parser.add_argument("--profiles", default="bench-results", help="reuse, plan: folder of profile-<consumer>.json")
    parser.add_argument("--blend", default="0.15", help="plan: CacheBlend-style baselines, shares of "
                        "recomputed tokens (comma-separated; empty for none)")
    parser.add_argument("--targets", default="0.25,0.5,1.2",
                        help="plan: TTFT targets as fractions of the measured full prefill")
    parser.add_argument("--device", default="cpu", help="reuse, plan: torch device of the models (cpu, cuda)")
    parser.add_argument("--synthetic", default="", help="reuse, plan: random-weight pairs at these shapes "
                        "(smollm2-135m,llama-3.2-1b,llama-3.1-8b) instead of the real SmolLM2 pairs: "
                        "TTFT and fidelity only (plan: profiled in the run)")
    parser.add_argument("--unaligned", default="", help="reuse: same-model reuse of a context of any length "
                        "plus a question on these models (smollm2 = the real SmolLM2; or shapes of --synthetic, "
                        "e.g. gemma3-270m with sliding-window layers): TTFT, the suffix's cost and decode per "
                        "token against the model alone")
    parser.add_argument("--requests", type=int, default=None, help="reuse --unaligned: prompts per model and "
                        "length (default 4); overhead: timed requests per mode and length (default 30)")
    parser.add_argument("--question-tokens", type=int, default=24,
                        help="reuse --unaligned: question length of the random-weight models' prompts")
    parser.add_argument("--new-tokens", type=int, default=16, help="reuse --unaligned: greedy tokens decoded")
    parser.add_argument("--slab-dtype", default="", help="reuse --unaligned: slab dtype (bfloat16, float32; "
                        "default: bfloat16 for the real models, float32 for random weights)")
    parser.add_argument("--profile-prompts", type=int, default=20,
                        help="plan --synthetic: random prompts the pair is profiled on")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak: how long")
    parser.add_argument("--seconds", type=float, default=6.0, help="cluster: seconds per scenario")
    parser.add_argument("--max-ops", type=int, default=10_000_000, help="soak: stop after this many operations")
    parser.add_argument("--workers", type=int, default=4, help="soak: client threads")
    parser.add_argument("--memory-mib", type=int, default=1024, help="soak: the node's memory tier (MiB)")
    agents = parser.add_argument_group("agents (cross-context reuse, issue 16)")
    agents.add_argument("--workload", choices=("copy", "task"), default="copy",
                        help="copy: random-symbol fully connected agents (TTFT); task: the access-code task")
    agents.add_argument("--modes", default="", help="dense first, then strategies (blend@R allowed) and planner; "
                        "default: every strategy and planner")
    agents.add_argument("--model", default="smollm2", help="smollm2 (the real one), or a --synthetic shape (copy)")
    agents.add_argument("--agents", type=int, default=5, help="copy: agents in the pipeline")
    agents.add_argument("--task-agents", default="3,5", help="task: pipeline sizes reported")
    agents.add_argument("--input-tokens", type=int, default=1024, help="copy: the round's input")
    agents.add_argument("--prefix-tokens", type=int, default=512, help="copy: each agent's own prefix")
    agents.add_argument("--output-tokens", type=int, default=512, help="copy: each agent's answer")
    agents.add_argument("--context-tokens", type=int, default=1024, help="task: records per round")
    agents.add_argument("--agent-rounds", type=int, default=2, help="timed rounds")
    agents.add_argument("--calibration-rounds", type=int, default=1,
                        help="rounds of other content the planner's profile is measured on (and a warm-up)")
    agents.add_argument("--calibrate", choices=("template", "placeholder"), default="template",
                        help="planner: profile each strategy on every placeholder at once (template), or on "
                             "each placeholder alone, the others computed (placeholder: a strategy per placeholder)")
    agents.add_argument("--answer-tokens", type=int, default=8, help="greedy tokens compared with dense")
    agents.add_argument("--max-kl", type=float, default=0.015, help="planner: median first-token KL target")
    agents.add_argument("--min-top1", type=float, default=0.95, help="planner: first-token top-1 target")
    agents.add_argument("--agent-plan", default="[20,24)",
                        help="task: the plan a fine-tuned agent reads the base model's segments with")
    agents.add_argument("--task-consumer", default="codes-upper", help="task: the fine-tune of agents 2..N")
    agents.add_argument("--anchor-gamma", type=float, default=0.3, help="kvcomm: entropy threshold scale")
    agents.add_argument("--anchor-temperature", type=float, default=0.1, help="kvcomm: distance temperature")
    agents.add_argument("--anchor-pool-bytes", default="6GiB",
                        help="kvcomm: the node's anchor pool budget (each agent's offsets for an anchor cost "
                             "about as much as the content's K/V)")
    agents.add_argument("--node-memory", default="12GiB", help="agents: the node's memory tier")
    parser.add_argument("--oversubscription", type=int, default=10,
                        help="soak: key space over the memory tier")


# A benchmark's module, where its name would shadow a package its engine-side script
# imports (vllm_worker.py runs beside these modules and imports vllm).
MODULES = {"vllm": "vllm_bench"}


def main(args: argparse.Namespace) -> int:
    return importlib.import_module(f"cachesvc_bench.{MODULES.get(args.bench, args.bench)}").main(args)
