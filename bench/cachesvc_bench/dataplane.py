"""``cachesvc bench dataplane``: GET and PUT throughput of every data path, each against
the ceiling of its own transport measured in the same run.

Paths: ``grpc`` (portable), ``tcp`` (socket data plane), ``shm`` (same host: copy out of
the node's shared memory tier; puts through its Unix socket), ``shm-direct`` (same host,
GET only: the slabs of a located hit copied straight out of the mapped memory tier by
``ArenaReader``, no request to the node; what the connectors do on the node's host),
``ucx`` (ucxx tagged messages; on one host UCX itself picks its shared-memory transports). Sizes: 4, 64 and 256 MiB
(entries of one 4 MiB E slab), and the realistic request, 2048 tokens × 30 layers of K
and V in bf16 (SmolLM2-135M shape, 47 MB), fetched whole and layer by layer.

Ceilings: ``grpc`` and ``tcp`` against a raw loopback TCP stream between two processes;
``shm`` GET against memcpy of the same bytes in the reader's piece size (one slab), and
``shm`` PUT against a raw Unix-socket stream; ``ucx`` against raw ucxx tagged messages
of one slab each between two processes, with the node's UCX settings. UCX (the ``ucx``
extra) and LMCache need their own installs; when absent the JSON says "not run" rather
than inventing figures.
LMCache runs in its own virtualenv (``make lmcache-venv``); what is compared with it, and
how, is in bench/cachesvc_bench/lmcache_compat.py.

All destination buffers are preallocated and reused, as a serving engine's would be.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from cachesvc.wire import ucxlib
from cachesvc.wire.keys import DType, FamilySpec, Kind
from cachesvc_bench.ceilings import CopyPasses, interleaved_best, socket_gbps, ucx_gbps, ucx_version
from cachesvc_bench.common import bench_server, machine, markdown_table, write_json
from cachesvc_bench.lmcache_compat import lmcache_section
from cachesvc_client import ArenaReader, CacheClient, ClientOptions, EntryData
from cachesvc_client.local import copy_rows

# One 4 MiB E slab per entry: 256 tokens × 8192 × bf16.
WIDE = FamilySpec("LlamaForCausalLM", 1, 1, 1, 8192, 10000.0, "", "bench-dataplane", DType.BFLOAT16)
SMOL = FamilySpec("LlamaForCausalLM", 30, 3, 64, 576, 100000.0, "", "bench-smollm2", DType.BFLOAT16)


@dataclasses.dataclass
class Case:
    name: str            # size label
    family: FamilySpec
    num_chunks: int
    kinds: tuple[Kind, ...]
    layer_wise: bool = False


CASES = [Case("4MiB", WIDE, 1, (Kind.E,)), Case("64MiB", WIDE, 16, (Kind.E,)),
         Case("256MiB", WIDE, 64, (Kind.E,)),
         Case("smollm2-2048tok-kv", SMOL, 8, (Kind.K, Kind.V)),
         Case("smollm2-2048tok-kv-layerwise", SMOL, 8, (Kind.K, Kind.V), layer_wise=True)]


@dataclasses.dataclass(frozen=True)
class Setup:
    """A server and client configuration; paths that share one share a server."""

    server_args: tuple[str, ...] = ()
    options: ClientOptions = ClientOptions()


@dataclasses.dataclass(frozen=True)
class Route:
    """How a benchmark path is reached: the client transport and the setup."""

    transport: str
    setup: Setup = Setup()


# UCX restricted to TCP: the network path it takes between hosts without RDMA. shm-direct
# puts (and the setup) are shm's.
PATHS = {"ucx-tcp": Route("ucx", Setup(("--ucx-tls", "tcp,self"), ClientOptions(ucx_tls="tcp,self"))),
         "shm-direct": Route("shm")}
DIRECT = "shm-direct"
SAME_HOST = ("shm", DIRECT)   # GETs bounded by memcpy: timed in turns with it


def _entries(family: FamilySpec, hashes, kinds, rng) -> list[EntryData]:
    slabs = {(kind, layer): rng.standard_normal(family.slab_shape(kind, 256), dtype=np.float32)
             .astype(ml_dtypes.bfloat16) for kind in kinds for layer in range(family.num_layers)}
    return [EntryData(h, slabs) for h in hashes]


def _best(fn, repeats: int) -> float:
    """``fn``'s best time in seconds over ``repeats`` rounds after a warm-up."""
    return interleaved_best({"run": fn}, repeats)["run"]


def run_case(client: CacheClient, case: Case, path: str, repeats: int, rng, ceilings) -> list[dict]:
    producer = f"bench-{case.family.tokenizer_fingerprint}"
    fid = client.register_model(producer, "0123abcd", case.family).family_id
    # distinct prompts per (path, case) so puts are never "already present"
    base = sum(map(ord, path + case.name)) * 10**6
    entries = _entries(case.family, client.hash_tokens(
        list(range(base, base + case.num_chunks * 256)), fid), case.kinds, rng)
    size = sum(a.nbytes for e in entries for a in e.slabs.values())
    transport = PATHS.get(path, Route(path)).transport
    rows = []
    if not case.layer_wise and path != DIRECT:
        round_ = [0]

        def put() -> None:
            round_[0] += 1
            fresh = [dataclasses.replace(e, position_offset=round_[0]) for e in entries]
            client.put(fid, producer, fresh, transport=transport)
        t = _best(put, repeats)
        piece = case.family.slab_bytes(case.kinds[0], 256)
        rows.append(_row(path, "put", case, size, t, ceilings["put"][path](size, piece)))
    client.put(fid, producer, entries, transport=transport)
    hit = client.lookup(fid, [e.chunk_hash for e in entries]).best()
    out = {k: np.empty((case.family.num_layers, case.num_chunks * 256,
                        *case.family.slab_shape(k, 1)[1:]), dtype=ml_dtypes.bfloat16)
           for k in case.kinds}

    def get() -> None:
        if case.layer_wise:
            stream = client.stream(fid, hit, case.kinds, out=out, transport=transport)
            for _layer in stream:
                pass
            got = stream.result()
        else:
            got = client.get(fid, hit, case.kinds, out=out, transport=transport)
        assert got.complete, got.missing[:2]
    piece = case.family.slab_bytes(case.kinds[0], 256)
    if path not in SAME_HOST:
        rows.append(_row(path, "get", case, size, _best(get, repeats), ceilings["get"][path](size, piece)))
    else:   # the ceiling (memcpy) timed in turns with the GET, and so are shm-direct's probes
        extra, probes = {}, {}
        if path == DIRECT:
            get, extra, probes = _direct(client, fid, [e.chunk_hash for e in entries], case, out)
        copies = CopyPasses(size, piece)
        best = interleaved_best({"get": get} | {f"ceiling {name}": fn for name, fn in copies.passes().items()}
                                | probes, repeats)
        gbps = {name: size / seconds / 1e9 for name, seconds in best.items()}
        row = _row(path, "get", case, size, best["get"], max(v for k, v in gbps.items() if k.startswith("ceiling ")))
        if path == DIRECT:
            memfd = max(v for k, v in gbps.items() if k.startswith("memfd "))
            row |= extra | {"copy_only_gbps": round(gbps["copy only"], 3), "memfd_ceiling_gbps": round(memfd, 3),
                            "of_memfd_ceiling": round(row["gbps"] / memfd, 3)}
        rows.append(row)
    client.delete(fid, chunk_hashes=[e.chunk_hash for e in entries])
    return rows


def _direct(client: CacheClient, fid: str, hashes: list[bytes], case: Case,
            out: dict) -> tuple[Callable[[], None], dict, dict[str, Callable[[], None]]]:
    """The GET of shm-direct: the hit's slabs copied out of the mapped memory tier, whole
    (one strided read per kind) or layer by layer; what locating adds to the lookup
    (like every path's GET it is timed without its lookup); and probes to time in turns
    with it: the same copying without verification (``copy only``: what the checksums
    cost), and memcpy out of a memfd mapping (``memfd ...``: the node's memory tier is
    one, and where the kernel gives shmem no huge pages it copies slower than the
    anonymous memory of the ``ceiling_gbps``)."""
    hit = client.lookup(fid, hashes, locate=True).best()
    reader = ArenaReader(client.arena(hit), case.family, hit)
    rows = {k: out[k].reshape(case.family.num_layers, -1).view(np.uint8) for k in case.kinds}

    def get() -> None:
        n, layers = hit.num_chunks, case.family.num_layers
        if case.layer_wise:
            whole = min(reader.read(k, layer, rows[k][layer], n) for layer in range(layers) for k in case.kinds)
        else:
            whole = min(reader.read_range(k, 0, layers, rows[k], n) for k in case.kinds)
        assert whole == n, f"{whole} of {n} entries read whole"

    def copy_only() -> None:   # the same copies without the checksums: what verifying costs
        n, layers = hit.num_chunks, case.family.num_layers
        for k in case.kinds:
            for start, stop in ([(layer, layer + 1) for layer in range(layers)] if case.layer_wise else [(0, layers)]):
                position = 0
                for span in reader.spans(k, start, stop, n):
                    copy_rows(rows[k][start:stop, position:position + span.size],
                              np.frombuffer(reader.arena, np.uint8, span.layers * span.size, span.arena_offset)
                              .reshape(span.layers, span.size))
                    position += span.size
    size = sum(a.nbytes for a in out.values())
    memfd = CopyPasses(size, case.family.slab_bytes(case.kinds[0], 256), from_memfd=True)

    def lookups(locate: bool) -> float:
        samples = []
        for _ in range(30):
            t0 = time.perf_counter()
            client.lookup(fid, hashes, locate=locate)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3
    plain, located = lookups(False), lookups(True)
    return get, {"lookup_ms": round(plain, 3), "locating_lookup_ms": round(located, 3)}, \
        {"copy only": copy_only} | {f"memfd {name}": fn for name, fn in memfd.passes().items()}


def _row(path: str, op: str, case: Case, size: int, seconds: float, ceiling: float) -> dict:
    gbps = size / seconds / 1e9
    return {"path": path, "op": op, "request": case.name, "size_bytes": size,
            "gbps": round(gbps, 3), "ceiling_gbps": round(ceiling, 3),
            "of_ceiling": round(gbps / ceiling, 3), "seconds": round(seconds, 4)}


def _ceiling_table() -> tuple[dict, dict]:
    """(functions (size, piece) -> GB/s per op and path, the memo of what was measured)."""
    cache: dict = {}

    def memo(key, fn):
        if key not in cache:
            cache[key] = fn()
        return cache[key]
    tcp = lambda size, piece=None: memo(("tcp", size), lambda: socket_gbps(size))  # noqa: E731
    unix = lambda size, piece=None: memo(("unix", size), lambda: socket_gbps(size, unix=True))  # noqa: E731
    # UCX GET sends from the node's memfd arena, a PUT from the client's numpy buffers:
    # on one host the kind of memory decides the speed (ceilings.ucx_gbps).
    ucx_get = lambda size, piece: memo(("ucx-from-shared", size, piece), lambda: ucx_gbps(size, piece))  # noqa: E731
    ucx_put = lambda size, piece: memo(("ucx-from-anon", size, piece),  # noqa: E731
                                       lambda: ucx_gbps(size, piece, shared=False))
    ucx_tcp = lambda size, piece: memo(("ucx-tcp", size, piece),  # noqa: E731
                                       lambda: ucx_gbps(size, piece, tls="tcp,self"))
    # shm and shm-direct GETs are bounded by memcpy, timed in turns with them (run_case).
    return {"get": {"grpc": tcp, "tcp": tcp, "ucx": ucx_get, "ucx-tcp": ucx_tcp},
            "put": {"grpc": tcp, "tcp": tcp, "shm": unix, "ucx": ucx_put, "ucx-tcp": ucx_tcp}}, cache


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    ceilings, measured = _ceiling_table()
    rows: list[dict] = []
    # Prefaulted, as a production node runs: otherwise every put lands in never-touched
    # shared memory (the arena never fills here) and measures page faults, not transport.
    paths = args.paths or "grpc,tcp,shm,shm-direct" + (",ucx,ucx-tcp" if ucxlib.available() else "")
    todo = [(case, path) for path in paths.split(",") for case in CASES]
    progress = tqdm(total=len(todo), desc="dataplane", unit="case")
    for setup in dict.fromkeys(PATHS.get(p, Route(p)).setup for p in paths.split(",")):
        # Prefaulted, as a production node runs: otherwise every put lands in never-touched
        # shared memory (the arena never fills here) and measures page faults, not transport.
        with bench_server("--memory-bytes", "3GiB", "--disk-mode", "off", "--memory-prefault",
                          "true", *setup.server_args) as srv, \
                CacheClient(srv.address, options=setup.options) as client:
            for case, path in todo:
                if PATHS.get(path, Route(path)).setup == setup:
                    rows.extend(run_case(client, case, path, args.repeats, rng, ceilings))
                    progress.update()
    progress.close()
    whole = {r["path"]: r["gbps"] for r in rows if r["request"] == "smollm2-2048tok-kv"}
    layer = {r["path"]: r["gbps"] for r in rows if r["request"] == "smollm2-2048tok-kv-layerwise"}
    return {
        "benchmark": "dataplane", "machine": machine(), "rows": rows,
        "ceilings": {"/".join(map(str, k)): round(v, 3) for k, v in measured.items()},
        "layerwise_vs_whole": {p: round(layer[p] / whole[p], 3) for p in whole if p in layer},
        "lmcache": lmcache_section(Path(args.lmcache_python), args.repeats, rows),
        "ucx": ucx_notes(paths),
    }


def ucx_notes(paths: str) -> dict:
    if "ucx" not in paths.split(","):
        return {"status": "not run" + ("" if ucxlib.available() else
                                       ": ucxx is not installed (pip install 'cachesvc[ucx]')")}
    shmem_thp = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    return {"status": f"ok: ucxx {ucx_version()}",
            "shmem_thp": shmem_thp.read_text().strip() if shmem_thp.exists() else "unknown",
            # The same raw transfer from huge-page-backed anonymous memory, for comparison.
            "ceiling_from_anon_64MiB_gbps": round(ucx_gbps(64 << 20, 4 << 20, shared=False), 3)}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(doc["rows"])
    for size in doc["lmcache"].get("sizes", []):   # LMCache's client: its own server, then ours
        for op in ("get", "put"):
            rows.append({"path": "LMCache", "op": op, "request": size["request"],
                         "gbps": size[f"{op}_gbps"], "ceiling_gbps": 0})
            rows.append({"path": "LMCache->lm://cachesvc", "op": op, "request": size["request"],
                         "gbps": size[f"lm_{op}_gbps"], "ceiling_gbps": 0})
    labels = [f"{r['path']} {r['op']}\n{r['request']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.55), 4.5))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["gbps"] for r in rows], 0.4, label="cachesvc (at right: LMCache 0.5.6's client, its server orange, ours green)",
           color=["tab:orange" if r["path"] == "LMCache" else "tab:green" if r["path"].startswith("LMCache->")
                   else "tab:blue" for r in rows])
    ax.bar(xs + 0.2, [r["ceiling_gbps"] for r in rows], 0.4, label="transport ceiling (same run)",
           color="lightgrey")
    ax.set_xticks(xs, labels, rotation=70, fontsize=7)
    ax.set_ylabel("GB/s (1e9 B/s)")
    ax.set_title("cachesvc data plane vs the ceiling of each transport")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> int:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = run(args)
    png = out.with_suffix(".png")
    plot(doc, png)
    doc["plot"] = str(png)
    write_json(out, doc)
    print(json.dumps(doc, indent=2))
    print()
    print(markdown_table(["path", "op", "request", "MB", "GB/s", "ceiling GB/s", "× ceiling", "copy only GB/s",
                          "memfd ceiling GB/s", "× memfd ceiling"],
                         [[r["path"], r["op"], r["request"], round(r["size_bytes"] / 1e6, 1),
                           r["gbps"], r["ceiling_gbps"], r["of_ceiling"], r.get("copy_only_gbps", "-"),
                           r.get("memfd_ceiling_gbps", "-"), r.get("of_memfd_ceiling", "-")] for r in doc["rows"]]))
    print(f"\nlayer-by-layer / whole (realistic request): {doc['layerwise_vs_whole']}")
    lmc = doc["lmcache"]
    if lmc.get("sizes"):
        print("\nLMCache 0.5.6's own client (LMCServerConnector) on both lm:// servers:")
        print(markdown_table(["request", "LMCache server get", "cachesvc lm:// get", "× LMCache", "TCP ceiling",
                              "LMCache server put", "cachesvc lm:// put", "× LMCache", "cachesvc shm get × LMCache"],
                             [[s["request"], s["get_gbps"], s["lm_get_gbps"], s["lm_get_vs_lmcache"],
                               s["tcp_ceiling_gbps"], s["put_gbps"], s["lm_put_gbps"], s["lm_put_vs_lmcache"],
                               s["shm_get_vs_lmcache"]] for s in lmc["sizes"]]))
        c = lmc["chunks_4mib"]
        print(f"\n100 chunks of 4 MiB through lm://: {c['identical']} identical, {c['wrong']} wrong; after a "
              f"restart {c['identical_after_restart']} identical, {c['wrong_after_restart']} wrong")
        l2 = lmc["l2"]
        print("\nlmcache bench l2 (32 keys of 4 MiB, verified):")
        print(markdown_table(["adapter", "store MB/s", "load MB/s", "store ok", "lookup ok", "load ok"],
                             [[name, r["store_mbps"], r["load_mbps"], r["store_ok"], r["lookup_ok"], r["load_ok"]]
                              for name, r in (("cachesvc plugin", l2["cachesvc"]),
                                              ("LMCache fs on tmpfs", l2["lmcache_fs_tmpfs"]))]))
    print(f"LMCache: {lmc['status']}; UCX: {doc['ucx']['status']}")
    return 0
