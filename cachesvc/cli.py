"""``cachesvc`` command line: serve, stats, ls, bench."""

from __future__ import annotations

import argparse
import json
import sys

from cachesvc.config import add_arguments, load_config
from cachesvc.logs import setup_logging


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(vars(args))
    except (ValueError, OSError) as exc:
        print(f"cachesvc serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    from cachesvc.server import serve
    return serve(config)


def _client(args: argparse.Namespace):
    from cachesvc_client import CacheClient
    return CacheClient(args.target)


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.stats(), indent=2))
    return 0


def _ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.models:
            for m in client.list_models():
                print(f"{m['model_id']:<32} family={m['family_id']} digest={m['weights_digest'][:16]}")
            return 0
        if args.profiles:
            for p in client.list_profiles():
                state = "stale" if p.stale else (f"flagged x{p.flags}: {p.flagged}" if p.flags else "ok")
                print(f"{p.producer:<28} -> {p.consumer:<28} v{p.version:<3} {p.size_bytes:>8} B  {state}")
            return 0
        token, shown = "", 0
        print(f"{'entry_id':<32} {'producer':<20} {'chunk_hash':<16} {'offset':>7} "
              f"{'tokens':>6} {'bytes':>10} {'tier':<6} layers(K/V/E)")
        while shown < args.limit:
            rows, token = client.list_entries(family_id=args.family, producer=args.producer,
                                              tenant=args.tenant, limit=min(500, args.limit - shown),
                                              page_token=token)
            for e in rows:
                lay = e.layout
                print(f"{e.entry_id.hex():<32} {e.producer:<20} {e.chunk_hash.hex()[:16]:<16} "
                      f"{e.position_offset:>7} {lay.num_tokens:>6} {e.size_bytes:>10} "
                      f"{'mem' if e.tier == 1 else 'disk':<6} "
                      f"{len(lay.k_layers)}/{len(lay.v_layers)}/{len(lay.e_layers)}"
                      f"{' pinned' if e.pinned else ''}")
            shown += len(rows)
            if not token:
                break
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.bench == "lookup":
        from cachesvc_bench.lookup import main as bench_main
    elif args.bench == "quality":
        from cachesvc_bench.quality import main as bench_main
    elif args.bench == "reuse":
        from cachesvc_bench.reuse import main as bench_main
    elif args.bench == "plan":
        from cachesvc_bench.plan import main as bench_main
    else:
        from cachesvc_bench.dataplane import main as bench_main
    return bench_main(args)


def _profile(args: argparse.Namespace) -> int:
    from cachesvc_connectors.profile_cmd import main as profile_main   # torch lives there, not here
    return profile_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cachesvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the cache service")
    add_arguments(serve)
    serve.set_defaults(func=_serve)
    for name, func, help_ in (("stats", _stats, "print server statistics as JSON"),
                              ("ls", _ls, "list entries, models or profiles")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--target", default="127.0.0.1:7070", help="server host:port")
        p.set_defaults(func=func)
        if name == "ls":
            p.add_argument("--models", action="store_true", help="list models instead")
            p.add_argument("--profiles", action="store_true",
                           help="list reuse profiles (stale, or flagged for re-profiling) instead")
            p.add_argument("--family", default="")
            p.add_argument("--producer", default="")
            p.add_argument("--tenant", default="")
            p.add_argument("--limit", type=int, default=100)
    prof = sub.add_parser("profile", help="profile a (producer, consumer) pair's reuse plans")
    try:
        from cachesvc_connectors.profile_cmd import add_arguments as profile_arguments
        profile_arguments(prof)
    except ImportError:       # the connectors' extras are not installed
        prof.add_argument("rest", nargs=argparse.REMAINDER)
    prof.set_defaults(func=_profile)
    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("bench", choices=["lookup", "dataplane", "quality", "reuse", "plan"])
    bench.add_argument("--json", required=True, help="write the JSON result here")
    bench.add_argument("--entries", type=int, default=100_000, help="lookup: index size")
    bench.add_argument("--batch", type=int, default=1024, help="lookup: hashes per batched lookup")
    bench.add_argument("--rounds", type=int, default=300, help="lookup: timed batched lookups")
    bench.add_argument("--paths", default="", help="dataplane: paths to measure (default: "
                       "grpc,tcp,shm, and ucx when ucxx is installed)")
    bench.add_argument("--repeats", type=int, default=3, help="dataplane: timed rounds (best kept)")
    bench.add_argument("--lmcache-python", default=".lmcache/venv/bin/python",
                       help="dataplane: python of LMCache's virtualenv (make lmcache-venv)")
    bench.add_argument("--consumers", default="codes-upper,codes-all",
                       help="quality, reuse, plan: fine-tuned consumers of SmolLM2")
    bench.add_argument("--prompts", type=int, default=100, help="quality: held-out prompts per pair; "
                       "reuse: prompts per context length")
    bench.add_argument("--records", type=int, default=25, help="quality: records per context")
    bench.add_argument("--seed", type=int, default=0, help="quality, reuse: data seed")
    bench.add_argument("--plans", default="none;[0,2);[10,12);[20,22);[28,30);[20,24);[20,26);"
                       "[10,20);[20,30);[15,30)", help="quality: plans, ';'-separated (single "
                       "groups at several depths and sizes; 'none' is full reuse)")
    bench.add_argument("--plan", default="codes-upper=[20,24);codes-all=[15,30)",
                       help="reuse: the plan of each consumer in mode 'plan'")
    bench.add_argument("--prompts-per-context", type=int, default=8,
                       help="reuse, plan: prompts per context length")
    bench.add_argument("--contexts", default="512,1024,2048,4096",
                       help="reuse, plan: context lengths (plan: use 1024,4096)")
    bench.add_argument("--profiles", default="bench-results", help="plan: folder of profile-<consumer>.json")
    bench.add_argument("--blend", default="0.15", help="plan: CacheBlend-style baselines, shares of "
                       "recomputed tokens (comma-separated; empty for none)")
    bench.add_argument("--targets", default="0.25,0.5,1.2",
                       help="plan: TTFT targets as fractions of the measured full prefill")
    bench.add_argument("--device", default="cpu", help="reuse, plan: torch device of the models (cpu, cuda)")
    bench.add_argument("--synthetic", default="", help="reuse, plan: random-weight pairs at these shapes "
                       "(smollm2-135m,llama-3.2-1b,llama-3.1-8b) instead of the real SmolLM2 pairs: "
                       "TTFT and fidelity only (plan: profiled in the run)")
    bench.add_argument("--profile-prompts", type=int, default=20,
                       help="plan --synthetic: random prompts the pair is profiled on")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
