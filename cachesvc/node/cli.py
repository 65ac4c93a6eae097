"""``cachesvc`` command line: ``serve``, ``stats`` and ``ls`` here; other packages add
subcommands through the ``cachesvc.commands`` entry-point group (``profile`` from
cachesvc_lab, ``bench`` from cachesvc_bench).

A registered command is a module with ``HELP`` (one line), ``add_arguments(parser)`` and
``main(args) -> int``, cheap to import (argparse only; heavy imports inside ``main``). Only
the command being run is imported, so ``cachesvc serve`` loads no torch, tqdm, SDK,
connector or benchmark code (tests/test_layout.py checks it). A command whose package's
extras are missing is listed and says so when run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import EntryPoint, entry_points

from cachesvc.node.auth import TokenTable, new_token
from cachesvc.node.config import add_arguments, load_config, load_quotas
from cachesvc.node.logs import setup_logging
from cachesvc.wire.keys import Tier


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(vars(args))
        if config.auth_tokens:
            TokenTable(config.auth_tokens)     # a bad tokens file is a clear error, not a traceback
        load_quotas(config.tenant_quotas)
    except (ValueError, OSError) as exc:
        print(f"cachesvc serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    from cachesvc.node.cluster import ClusterRefused
    from cachesvc.node.server import serve
    try:
        return serve(config)
    except ClusterRefused as exc:
        print(f"cachesvc serve: {exc}", file=sys.stderr)
        return 2


def _client(args: argparse.Namespace):
    from cachesvc_client import CacheClient, ClientOptions
    return CacheClient(args.target, ClientOptions(token=os.environ.get("CACHESVC_TOKEN", "")))


def _token(args: argparse.Namespace) -> int:
    """Print a new token (once: only its SHA-256 is kept) and its tokens-file entry."""
    try:
        token, entry = new_token(args.name, args.tenant, args.role)
    except KeyError:
        print(f"cachesvc token: role must be read, write or admin; got {args.role!r}", file=sys.stderr)
        return 2
    print(f"token (give it to the client as CACHESVC_TOKEN or ClientOptions(token=...); it is not stored):\n"
          f"  {token}\nentry for the --auth-tokens file's \"tokens\" list:\n  {json.dumps(entry)}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.stats(), indent=2))
    return 0


def _ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.models:
            for m in client.list_models(tenant=args.tenant):
                print(f"{m['model_id']:<32} family={m['family_id']} digest={m['weights_digest'][:16]}")
            return 0
        if args.profiles:
            for p in client.list_profiles(tenant=args.tenant):
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
                      f"{'mem' if e.tier == Tier.MEMORY else 'disk':<6} "
                      f"{len(lay.k_layers)}/{len(lay.v_layers)}/{len(lay.e_layers)}"
                      f"{' pinned' if e.pinned else ''}")
            shown += len(rows)
            if not token:
                break
    return 0


COMMAND_GROUP = "cachesvc.commands"
NODE_COMMANDS = ("serve", "stats", "ls", "token")


def registered_commands() -> dict[str, EntryPoint]:
    """Subcommands other installed packages register, by name (node commands win)."""
    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP) if ep.name not in NODE_COMMANDS}


def _unavailable(name: str, exc: ImportError):
    def run(args: argparse.Namespace) -> int:
        print(f"cachesvc {name}: not available here ({exc}); install cachesvc with its extras "
              f"(pip install 'cachesvc[torch,hf,bench]')", file=sys.stderr)
        return 2
    return run


def _add_registered(sub, name: str, entry: EntryPoint) -> None:
    try:
        module = entry.load()
    except ImportError as exc:
        p = sub.add_parser(name, help=f"(unavailable: {exc})")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_unavailable(name, exc))
        return
    p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(func=module.main)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; of the registered commands only the one ``argv`` names is imported
    (all of them when it names none, for ``--help``)."""
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="cachesvc", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    token = sub.add_parser("token", help="make an API token for a node started with --auth-tokens")
    token.add_argument("--tenant", required=True, help="the tenant it acts as ('' only for admin)")
    token.add_argument("--role", required=True, help="read, write or admin")
    token.add_argument("--name", default="token", help="the label logs show for it")
    token.set_defaults(func=_token)
    registered = registered_commands()
    for name, entry in sorted(registered.items()):
        if wanted is None or wanted == name or wanted not in (*NODE_COMMANDS, *registered):
            _add_registered(sub, name, entry)
        else:
            p = sub.add_parser(name, help=f"see cachesvc {name} --help", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
