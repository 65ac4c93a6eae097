"""``cachesvc bench cluster``: the cluster on loopback (a redis-server and cachesvc nodes as
processes on this one machine, so more nodes share the same cores; said in the output).

Rows (``scenario``):

- ``lookup``: batched lookups of a 1024-chunk prompt, 1 node against 3, through the
  nodes (client processes spread over them: ``lookup_chunks_per_s``), and ``lookup-redis``:
  the SDK reading Redis itself (its p50 is the issue's 5 ms target);
- ``get``: cluster fetches of 16-chunk prompts, verified byte for byte;
- chaos, 3 nodes, replication 2, readers verifying every byte while writers put:
  ``kill9`` (a node killed -9 under load), ``redis_restart`` (Redis restarted empty; the
  nodes rebuild the index), ``paused`` (a node stopped with SIGSTOP: no heartbeat, no
  answers), ``stale`` (a node returns with entries of weights replaced meanwhile).

Each row has ``nodes``, ``replication``, ``scenario``, ``ops``, ``wrong_bytes``,
``hits_retained`` (chunks delivered whole over chunks asked, after the event, against
before it; redis_restart: after recovery), ``fallback_s`` (kill9/paused: the slowest
read once the event happened; redis_restart: until reads were back at 99% of before),
``lookup_chunks_per_s``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from cachesvc.node.launcher import LocalCluster
from cachesvc_bench.common import finish, machine
from cachesvc_client import DType, EntryData, FamilySpec, Kind, UnavailableError
from cachesvc_client.cluster import ClusterClient

FAMILY = FamilySpec(architecture="LlamaForCausalLM", num_layers=4, num_kv_heads=2, head_dim=8, hidden_size=16,
                    rope_theta=10000.0, rope_scaling_json="", tokenizer_fingerprint="bench-cluster-v1",
                    dtype=DType.BFLOAT16)
KINDS = (Kind.K, Kind.V, Kind.E)
NODE_ARGS = ["--memory-bytes", "256MiB", "--heartbeat-ttl-s", "1", "--log-level", "warning", "--disk-mode", "off"]
LOOKUP_CHUNKS = 1024
PROMPT_CHUNKS = 16


def entry(rng: np.random.Generator, chunk_hash: bytes, index: int, kinds=KINDS, layers=range(4)) -> EntryData:
    slabs = {(k, layer): rng.standard_normal(FAMILY.slab_shape(k, 256), dtype=np.float32).astype(ml_dtypes.bfloat16)
             for k in kinds for layer in layers}
    return EntryData(chunk_hash, slabs, 256 * index)


def prompt(client: ClusterClient, family_id: str, rng: np.random.Generator, seed: int, chunks: int = PROMPT_CHUNKS,
           small: bool = False) -> tuple[list[bytes], list[EntryData]]:
    hashes = client.hash_tokens([seed * 1_000_000 + i for i in range(256 * chunks)], family_id)
    kinds, layers = ((Kind.K,), range(1)) if small else (KINDS, range(4))
    return hashes, [entry(rng, h, i, kinds, layers) for i, h in enumerate(hashes)]


def whole(slabs, entries: list[EntryData]) -> tuple[int, int]:
    """(chunks delivered whole and identical, chunks delivered but different)."""
    good = bad = 0
    for i, e in enumerate(entries[:slabs.valid_chunks]):
        t0 = slabs.token_offsets[i]
        same = all(slabs.arrays[k][layer - slabs.layer_start, t0:t0 + 256].tobytes() == a.tobytes()
                   for (k, layer), a in e.slabs.items())
        good, bad = (good + 1, bad) if same else (good, bad + 1)
    return good, bad


# ------------------------------------------------------------ throughput


def _lookup_worker(seeds: list[str], family_id: str, hashes: list[bytes], seconds: float, out: mp.Queue) -> None:
    with ClusterClient(seeds=seeds) as client:
        client.lookup(family_id, hashes)           # warm: channels, membership
        done, chunks, t_end = 0, 0, time.monotonic() + seconds
        while time.monotonic() < t_end:
            hit = client.lookup(family_id, hashes).best("bench")
            chunks += hit.num_chunks if hit else 0
            done += 1
        out.put((done, chunks))


def lookup_rows(cluster: LocalCluster, replication: int, seconds: float) -> list[dict]:
    nodes = len(cluster.live())
    with ClusterClient(redis_url=cluster.redis.url, replication=replication) as client:
        client.wait_ready(nodes)
        reg = client.register_model("bench", "abcdef01", FAMILY)
        hashes, entries = prompt(client, reg.family_id, np.random.default_rng(1), 7, LOOKUP_CHUNKS, small=True)
        client.put(reg.family_id, "bench", entries)
        samples = []
        for _ in range(200):
            t0 = time.perf_counter()
            hit = client.lookup(reg.family_id, hashes).best("bench")
            samples.append(time.perf_counter() - t0)
            assert hit is not None and hit.num_chunks == LOOKUP_CHUNKS
        redis_row = row(nodes, replication, "lookup-redis", len(samples), 0, 1.0, None,
                        LOOKUP_CHUNKS * len(samples) / sum(samples), samples)
    seeds = [n.address for n in cluster.live()]
    queue: mp.Queue = mp.get_context("spawn").Queue()
    workers = [mp.get_context("spawn").Process(target=_lookup_worker, args=(seeds, reg.family_id, hashes, seconds,
                                                                           queue)) for _ in range(3)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join()
    ops, chunks = sum(r[0] for r in results), sum(r[1] for r in results)
    node_row = row(nodes, replication, "lookup", ops, 0, chunks / (ops * LOOKUP_CHUNKS), None, chunks / seconds)
    return [redis_row, node_row]


def get_row(cluster: LocalCluster, replication: int, seconds: float) -> dict:
    nodes = len(cluster.live())
    with ClusterClient(redis_url=cluster.redis.url, replication=replication) as client:
        reg = client.register_model("bench", "abcdef01", FAMILY)
        rng = np.random.default_rng(2)
        prompts = [prompt(client, reg.family_id, rng, 100 + s) for s in range(8)]
        for _, entries in prompts:
            client.put(reg.family_id, "bench", entries)
        ops = chunks = wrong = 0
        samples = []
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            hashes, entries = prompts[ops % len(prompts)]
            t0 = time.perf_counter()
            hit = client.lookup(reg.family_id, hashes).best("bench")
            good, bad = whole(client.get(reg.family_id, hit, KINDS), entries)
            samples.append(time.perf_counter() - t0)
            ops, chunks, wrong = ops + 1, chunks + good, wrong + bad
        return row(nodes, replication, "get", ops, wrong, chunks / (ops * PROMPT_CHUNKS), None,
                   None, samples, chunks_per_s=chunks / sum(samples))


# ------------------------------------------------------------ chaos


@dataclass
class Load:
    """Readers verifying every chunk they accept, and a writer, against one cluster."""

    redis_url: str
    family_id: str
    prompts: list[tuple[list[bytes], list[EntryData]]]
    readers: int = 3
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reads: list[tuple[float, float, int, int, int]] = field(default_factory=list)   # (start, took, asked, good, bad)
    errors: int = 0
    writes: int = 0
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, writable: list[tuple[list[bytes], list[EntryData]]]) -> "Load":
        self.threads = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(self.readers)]
        self.threads.append(threading.Thread(target=self._write, args=(writable,), daemon=True))
        for t in self.threads:
            t.start()
        return self

    def _read(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with ClusterClient(redis_url=self.redis_url) as client:
            while not self.stop.is_set():
                hashes, entries = self.prompts[int(rng.integers(len(self.prompts)))]
                t0 = time.monotonic()
                try:
                    hit = client.lookup(self.family_id, hashes).best("bench")
                    good, bad = whole(client.get(self.family_id, hit, KINDS), entries) if hit else (0, 0)
                except UnavailableError:
                    with self.lock:
                        self.errors += 1
                    time.sleep(0.05)
                    continue
                with self.lock:
                    self.reads.append((t0, time.monotonic() - t0, len(entries), good, bad))

    def _write(self, writable) -> None:
        with ClusterClient(redis_url=self.redis_url) as client:
            for _, entries in writable:
                if self.stop.is_set():
                    return
                try:
                    client.put(self.family_id, "bench", entries)
                    with self.lock:
                        self.writes += 1
                except UnavailableError:
                    with self.lock:
                        self.errors += 1

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def summary(self, event_at: float, after_from: float | None = None) -> dict:
        """Reads before the event against reads from ``after_from`` (default: the event)."""
        before = [r for r in self.reads if r[0] < event_at]
        after = [r for r in self.reads if r[0] >= (event_at if after_from is None else after_from)]

        def rate(rows):
            return sum(r[3] for r in rows) / max(1, sum(r[2] for r in rows))
        return {"ops": len(self.reads) + self.writes, "reads": len(self.reads), "writes": self.writes,
                "errors": self.errors, "wrong_bytes": sum(r[4] for r in self.reads) * chunk_bytes(),
                "hits_retained": round(rate(after) / rate(before), 4) if before and rate(before) else None,
                "slowest_after_s": max((r[1] for r in after), default=None), "after": after, "before": before}


def chunk_bytes() -> int:
    return sum(FAMILY.slab_bytes(k, 256) for k in KINDS) * FAMILY.num_layers


def chaos_row(workdir: Path, scenario: str, seconds: float) -> dict:
    args = [*NODE_ARGS, "--replication", "2"]
    if scenario == "stale":
        args = [a if a != "off" else "write_through" for a in args]    # the returning node needs its disk
    with LocalCluster(workdir / scenario, 3, args) as cluster, \
            ClusterClient(redis_url=cluster.redis.url) as client:
        client.wait_ready(3)
        reg = client.register_model("bench", "abcdef01", FAMILY)
        rng = np.random.default_rng(3)
        prompts = [prompt(client, reg.family_id, rng, s, 4) for s in range(40)]
        for _, entries in prompts[:16]:
            client.put(reg.family_id, "bench", entries)
        if scenario == "stale":
            return stale_row(cluster, client, reg.family_id, prompts[:16])
        load = Load(cluster.redis.url, reg.family_id, prompts[:16]).start(prompts[16:])
        time.sleep(seconds / 3)
        event_at = time.monotonic()
        if scenario == "kill9":
            cluster.nodes["n1"].stop(signal.SIGKILL)
        elif scenario == "paused":
            cluster.nodes["n1"].proc.send_signal(signal.SIGSTOP)
        elif scenario == "redis_restart":
            cluster.redis.restart()
        time.sleep(2 * seconds / 3)
        load.finish()
        if scenario == "paused":
            cluster.nodes["n1"].proc.send_signal(signal.SIGCONT)
        s = load.summary(event_at)
        if scenario == "redis_restart":
            # Reads fail while Redis is away; what counts is how soon they are back and
            # whether the rebuilt index holds everything: the hits after recovery.
            fallback = recovery_s(s, event_at)
            if fallback is not None:
                s = load.summary(event_at, event_at + fallback)
        else:
            fallback = s["slowest_after_s"]
        return row(3, 2, scenario, s["ops"], s["wrong_bytes"], s["hits_retained"], fallback, None,
                   [r[1] for r in s["after"]], errors=s["errors"], writes=s["writes"])


def recovery_s(summary: dict, event_at: float, window_s: float = 0.5) -> float | None:
    """Seconds from the event until reads in a ``window_s`` window delivered at least 99%
    of the chunks they did before it."""
    before = summary["before"]
    base = sum(r[3] for r in before) / max(1, sum(r[2] for r in before))
    after = sorted(summary["after"])
    for i, (t0, *_rest) in enumerate(after):
        window = [r for r in after[i:] if r[0] < t0 + window_s]
        if sum(r[3] for r in window) >= 0.99 * base * sum(r[2] for r in window):
            return round(t0 - event_at, 3)
    return None


def stale_row(cluster: LocalCluster, client: ClusterClient, family_id: str, prompts) -> dict:
    """n2 stops; the model is replaced; n2 returns with its old entries: none may hit."""
    cluster.nodes["n2"].stop(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "n2" in client.nodes(fresh=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    client.register_model("bench", "12345678", FAMILY, replace=True)
    t0 = time.monotonic()
    cluster.start_node("n2")
    client.wait_ready(3)
    ops = stale = 0
    while time.monotonic() < t0 + 3:
        for hashes, _ in prompts:
            ops += 1
            stale += sum(h.num_chunks for h in client.lookup(family_id, hashes).hits)
    return row(3, 2, "stale", ops, stale * chunk_bytes(), 1.0 if stale == 0 else 0.0, None, None, [],
               stale_hits=stale)


# ------------------------------------------------------------ output


def row(nodes: int, replication: int, scenario: str, ops: int, wrong_bytes: int, hits_retained: float | None,
        fallback_s: float | None, lookup_chunks_per_s: float | None, samples=(), **extra) -> dict:
    out = {"nodes": nodes, "replication": replication, "scenario": scenario, "ops": ops, "wrong_bytes": wrong_bytes,
           "hits_retained": None if hits_retained is None else round(hits_retained, 4),
           "fallback_s": None if fallback_s is None else round(fallback_s, 3),
           "lookup_chunks_per_s": None if lookup_chunks_per_s is None else round(lookup_chunks_per_s),
           "p50_ms": round(statistics.median(samples) * 1e3, 3) if samples else None,
           "p99_ms": round(float(np.percentile(samples, 99)) * 1e3, 3) if samples else None}
    return out | {k: (round(v) if isinstance(v, float) else v) for k, v in extra.items()}


def plot(doc: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = doc["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lookups = [r for r in rows if r["scenario"] == "lookup"]
    left.bar([f"{r['nodes']} node(s)" for r in lookups], [r["lookup_chunks_per_s"] / 1e3 for r in lookups])
    left.set(ylabel="thousand chunks looked up / s", title="batched lookups through the nodes (one machine)")
    chaos = [r for r in rows if r["scenario"] in ("kill9", "paused", "redis_restart", "stale")]
    right.bar([r["scenario"] for r in chaos], [r["hits_retained"] or 0 for r in chaos], label="hits retained")
    for i, r in enumerate(chaos):
        right.annotate(f"wrong bytes {r['wrong_bytes']}\nfallback {r['fallback_s']} s", (i, 0.05), ha="center",
                       fontsize=7)
    right.axhline(0.99, color="gray", ls=":", label="99%")
    right.set(ylim=(0, 1.1), title="chaos: 3 nodes, replication 2")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    seconds = args.seconds
    workdir = Path(tempfile.mkdtemp(prefix="cachesvc-bench-cluster-"))
    rows: list[dict] = []
    steps = [("1 node", 1), ("3 nodes", 3), "kill9", "redis_restart", "paused", "stale"]
    for step in tqdm(steps, desc="bench cluster", unit="scenario"):
        if isinstance(step, tuple):
            size = step[1]
            with LocalCluster(workdir / f"size{size}", size, [*NODE_ARGS, "--replication", str(min(2, size))]) as cl:
                rows += lookup_rows(cl, min(2, size), seconds)
                rows.append(get_row(cl, min(2, size), seconds))
        else:
            rows.append(chaos_row(workdir, step, seconds))
    by = {(r["scenario"], r["nodes"]): r for r in rows}
    speedup = by[("lookup", 3)]["lookup_chunks_per_s"] / by[("lookup", 1)]["lookup_chunks_per_s"]
    doc = {"benchmark": "cluster", "machine": machine(), "seconds_per_scenario": seconds,
           "note": "every process (Redis, nodes, clients) on this one machine: 3 nodes share its cores",
           "lookup_speedup_3_vs_1": round(speedup, 3), "rows": rows,
           "targets": {"kill9": "0 wrong bytes, hits_retained >= 0.99, fallback_s <= 2",
                       "redis_restart": "fallback_s (back to 99% of hits) <= 30",
                       "lookup-redis": "p50_ms <= 5 for 1024 hashes", "lookup": "3 nodes >= 1.6x one node"}}
    return finish(args.json, doc, plot,
                  ["scenario", "nodes", "replication", "ops", "wrong bytes", "hits retained", "fallback s",
                   "lookup chunks/s", "p50 ms", "p99 ms"],
                  [[r["scenario"], r["nodes"], r["replication"], r["ops"], r["wrong_bytes"], r["hits_retained"],
                    r["fallback_s"], r["lookup_chunks_per_s"], r["p50_ms"], r["p99_ms"]] for r in rows])
