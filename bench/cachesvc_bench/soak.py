"""``cachesvc bench soak``: a node under mixed load for ``--minutes``, oversubscribed.

``--workers`` threads (each its own client) put, read and delete entries of three tenants
over a key space ``--oversubscription`` times the node's memory tier (``--memory-mib``;
the disk tier holds twice that, the rest is evicted). Every entry's bytes follow from its
tenant and key, so every read is checked byte for byte against what was put: a miss is
fine (evicted or deleted), different bytes are not. Puts of keys already stored are
no-ops, as for any client.

Every second a sampler reads the node process's RSS, open file descriptors and threads,
and the p99 of the lookups of that second. ``fd_growth`` and ``thread_growth`` are end
÷ start − 1, with "start" the first sample after a tenth of the run (client pools and
the node's per-connection threads are set up by then) and "end" the last sample taken
while every worker was still running (after that their connections close). ``peak_rss_over_budget`` is peak
RSS ÷ (memory tier bytes): the interpreter's own ~100 MB is inside it, so budgets under
1 GiB cannot reach 1.1.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import psutil
from tqdm import tqdm

from cachesvc.wire.keys import DType, FamilySpec, Kind
from cachesvc_bench.common import bench_server, finish, machine
from cachesvc_client import CacheClient, CacheServiceError, EntryData

# 2 MiB entries: 4 layers of K and V, 256 tokens x 8 heads x 64 in bf16.
FAMILY = FamilySpec("LlamaForCausalLM", 4, 8, 64, 512, 10000.0, "", "bench-soak", DType.BFLOAT16)
TENANTS = ("tenant-a", "tenant-b", "tenant-c")
MIX = (("put", 0.4), ("read", 0.5), ("delete", 0.1))


def entry_bytes() -> int:
    return 2 * FAMILY.num_layers * FAMILY.slab_bytes(Kind.K, 256)


def _tokens(tenant: int, key: int) -> list[int]:
    start = (tenant * 1_000_003 + key) * 256
    return list(range(start, start + 256))


def _slabs(tenant: int, key: int) -> dict[tuple[Kind, int], np.ndarray]:
    """The entry of (tenant, key): the same bytes every time they are made."""
    rng = np.random.default_rng((tenant, key))
    raw = rng.integers(0, 2**16, (2, FAMILY.num_layers, *FAMILY.slab_shape(Kind.K, 256)), dtype=np.uint16)
    view = raw.view(ml_dtypes.bfloat16)
    return {(kind, layer): view[k, layer] for k, kind in enumerate((Kind.K, Kind.V))
            for layer in range(FAMILY.num_layers)}


@dataclass
class Tally:
    ops: dict[str, int] = field(default_factory=lambda: {"put": 0, "read": 0, "delete": 0})
    hits: int = 0
    misses: int = 0
    errors: list[str] = field(default_factory=list)
    wrong_bytes: int = 0
    lookup_s: list[tuple[float, float]] = field(default_factory=list)   # (when, seconds)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _worker(address: str, fid: str, keys: int, deadline: float, max_ops: int, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    with CacheClient(address) as client:
        while time.monotonic() < deadline:
            with tally.lock:
                if sum(tally.ops.values()) >= max_ops:
                    return
            op = rng.choices([m for m, _ in MIX], [w for _, w in MIX])[0]
            tenant, key = rng.randrange(len(TENANTS)), rng.randrange(keys)
            name = TENANTS[tenant]
            try:
                (chunk,) = client.hash_tokens(_tokens(tenant, key), fid, tenant=name)
                if op == "put":
                    client.put(fid, "soak", [EntryData(chunk, _slabs(tenant, key))], tenant=name)
                elif op == "delete":
                    client.delete(fid, chunk_hashes=[chunk], tenant=name)
                else:
                    t0 = time.perf_counter()
                    hit = client.lookup(fid, [chunk], tenant=name).best()
                    took = time.perf_counter() - t0
                    got = client.get(fid, hit, (Kind.K, Kind.V), tenant=name) if hit is not None else None
                    wrong = _wrong_bytes(got, tenant, key) if got is not None and got.valid_chunks else 0
                    with tally.lock:
                        tally.lookup_s.append((time.monotonic(), took))
                        tally.wrong_bytes += wrong
                        if got is not None and got.valid_chunks:
                            tally.hits += 1
                        else:
                            tally.misses += 1
            except CacheServiceError as exc:   # e.g. the memory tier full of reservations
                with tally.lock:
                    tally.errors.append(f"{op}: {type(exc).__name__}: {exc}"[:200])
            with tally.lock:
                tally.ops[op] += 1


def _wrong_bytes(got, tenant: int, key: int) -> int:
    expected = _slabs(tenant, key)
    wrong = 0
    for kind in (Kind.K, Kind.V):
        for layer in range(FAMILY.num_layers):
            a = np.asarray(got.arrays[kind][layer]).view(np.uint8)
            b = expected[(kind, layer)].view(np.uint8)
            wrong += int(np.count_nonzero(a.reshape(-1) != b.reshape(-1)))
    return wrong


def _sample(proc: psutil.Process, tally: Tally, since: float, running: int) -> dict:
    with tally.lock:
        recent = [s for when, s in tally.lookup_s if when >= since]
    p99 = float(np.percentile(recent, 99)) * 1e3 if recent else None
    return {"t_s": round(time.monotonic(), 2), "rss_bytes": proc.memory_info().rss, "fds": proc.num_fds(),
            "threads": proc.num_threads(), "p99_lookup_ms": round(p99, 3) if p99 is not None else None,
            "workers_running": running}


def run(args: argparse.Namespace) -> dict:
    minutes = args.minutes
    memory = args.memory_mib << 20
    keys = max(1, args.oversubscription * memory // entry_bytes() // len(TENANTS))
    samples: list[dict] = []
    tally = Tally()
    with bench_server("--memory-bytes", str(memory), "--disk-mode", "spill", "--disk-bytes", str(2 * memory),
                      "--memory-prefault", "true") as srv, CacheClient(srv.address) as client:
        for tenant in TENANTS:          # models are per tenant, like entries
            fid = client.register_model("soak", "0123abcd", FAMILY, tenant=tenant).family_id
        proc = psutil.Process(srv.proc.pid)
        start = time.monotonic()
        deadline = start + minutes * 60
        progress = tqdm(desc="soak", unit="s", total=round(minutes * 60))   # time-bounded: seconds
        workers = [threading.Thread(target=_worker, args=(srv.address, fid, keys, deadline, args.max_ops, tally,
                                                          args.seed + i), daemon=True)
                   for i in range(args.workers)]
        for w in workers:
            w.start()
        last = time.monotonic()
        while any(w.is_alive() for w in workers):
            time.sleep(1.0)
            samples.append(_sample(proc, tally, last, sum(w.is_alive() for w in workers)))
            last = time.monotonic()
            progress.update(1)
            progress.set_postfix(ops=sum(tally.ops.values()), wrong_bytes=tally.wrong_bytes)
        progress.close()
        stats = client.stats()
    for s in samples:
        s["t_s"] = round(s["t_s"] - start, 2)
    elapsed = samples[-1]["t_s"] if samples else 0.0
    # Growth from a tenth into the run to the last sample with every worker still at it
    # (once they stop, their connections close and the counts drop).
    baseline = next((s for s in samples if s["t_s"] >= elapsed / 10), samples[0]) if samples else None
    loaded = [s for s in samples if s["workers_running"] == args.workers] or samples
    end = loaded[-1] if loaded else None
    lookups = [s for _, s in tally.lookup_s]
    return {
        "benchmark": "soak", "machine": machine(), "minutes": round(elapsed / 60, 3), "workers": args.workers,
        "memory_bytes": memory, "disk_bytes": 2 * memory, "entry_bytes": entry_bytes(),
        "key_space_bytes": keys * len(TENANTS) * entry_bytes(), "oversubscription": args.oversubscription,
        "tenants": len(TENANTS), "ops": sum(tally.ops.values()), "ops_by_kind": tally.ops,
        "reads_hit": tally.hits, "reads_missed": tally.misses, "errors": len(tally.errors),
        "error_examples": tally.errors[:5], "wrong_bytes": tally.wrong_bytes,
        "peak_rss_over_budget": round(max(s["rss_bytes"] for s in samples) / memory, 3) if samples else None,
        "fd_growth": round(end["fds"] / baseline["fds"] - 1, 3) if samples else None,
        "thread_growth": round(end["threads"] / baseline["threads"] - 1, 3) if samples else None,
        "p99_lookup_ms": round(float(np.percentile(lookups, 99)) * 1e3, 3) if lookups else None,
        "median_lookup_ms": round(statistics.median(lookups) * 1e3, 3) if lookups else None,
        "evictions": {tier: stats[tier]["evictions"] for tier in ("memory", "disk") if tier in stats},
        "samples": samples,
    }


def plot(doc: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samples = doc["samples"]
    t = [s["t_s"] for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    axes[0][0].plot(t, [s["rss_bytes"] / 2**20 for s in samples])
    axes[0][0].axhline(doc["memory_bytes"] / 2**20, color="gray", ls=":", label="memory tier budget")
    axes[0][0].set(ylabel="node RSS (MiB)")
    axes[0][0].legend(fontsize=8)
    axes[0][1].plot(t, [s["p99_lookup_ms"] for s in samples])
    axes[0][1].set(ylabel="p99 lookup of the second (ms)")
    axes[1][0].plot(t, [s["fds"] for s in samples])
    axes[1][0].set(xlabel="s", ylabel="open file descriptors")
    axes[1][1].plot(t, [s["threads"] for s in samples])
    axes[1][1].set(xlabel="s", ylabel="threads")
    fig.suptitle(f"soak: {doc['ops']} ops, {doc['workers']} workers, {doc['oversubscription']}x memory, "
                 f"wrong bytes {doc['wrong_bytes']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    doc = run(args)
    return finish(args.json, doc, plot,
                  ["minutes", "ops", "hits", "misses", "errors", "wrong bytes", "peak RSS / budget", "fd growth",
                   "thread growth", "p99 lookup ms"],
                  [[doc["minutes"], doc["ops"], doc["reads_hit"], doc["reads_missed"], doc["errors"],
                    doc["wrong_bytes"], doc["peak_rss_over_budget"], doc["fd_growth"], doc["thread_growth"],
                    doc["p99_lookup_ms"]]])
