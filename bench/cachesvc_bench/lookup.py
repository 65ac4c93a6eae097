"""``cachesvc bench lookup``: batched longest-prefix lookups against a large index.

Builds an index of ``--entries`` entries (prompts of ``--batch`` chunks each) in a real
server process, then times, in the same run:
  - batched: one Lookup of a whole prompt's ``--batch`` hashes, every one a hit (the
    worst case: the answer lists ``--batch`` entries);
  - single: the same chunks looked up one hash per call (the baseline a client without
    batching would pay).
Prints JSON (top-level ``p50_ms``, ``p99_ms``, ``chunks_per_s`` are the batched figures;
``single`` holds the same for the loop), a markdown table, and writes a latency CDF plot.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from cachesvc.wire.keys import DType, FamilySpec, Kind
from cachesvc_bench.common import (bench_server, latency_summary, machine, markdown_table,
                                   write_json)
from cachesvc_client import CacheClient, EntryData

# The smallest legal entry: one layer of K for 256 tokens of a 1×1 head (512 bytes),
# so the index, not the payload, is what is measured.
INDEX_FAMILY = FamilySpec("LlamaForCausalLM", 1, 1, 1, 1, 10000.0, "", "bench-lookup", DType.BFLOAT16)
TARGET_P50_MS = 5.0
TARGET_CHUNKS_PER_S = 200_000


def build_index(client: CacheClient, family_id: str, prompts: int, batch: int) -> list[list[bytes]]:
    slab = {(Kind.K, 0): np.zeros((256, 1, 1), dtype=ml_dtypes.bfloat16)}
    chains = []
    for p in tqdm(range(prompts), desc="building index", unit="prompt"):
        tokens = [p] + list(range(1, batch * 256))      # first token differs per prompt
        hashes = client.hash_tokens(tokens, family_id)
        client.put(family_id, "producer", [EntryData(h, slab) for h in hashes])
        chains.append(hashes)
    return chains


def run(args: argparse.Namespace) -> dict:
    prompts = -(-args.entries // args.batch)
    with bench_server("--memory-bytes", "1GiB", "--disk-mode", "off") as srv, \
            CacheClient(srv.address) as client:
        reg = client.register_model("producer", "0123abcd", INDEX_FAMILY)
        chains = build_index(client, reg.family_id, prompts, args.batch)
        entries = client.stats()["entries"]
        rnd = random.Random(0)
        for _ in range(20):                               # warm-up
            client.lookup(reg.family_id, rnd.choice(chains))
        batched = []
        for _ in tqdm(range(args.rounds), desc="batched lookups", unit="call"):
            chain = rnd.choice(chains)
            t0 = time.perf_counter()
            hit = client.lookup(reg.family_id, chain).best()
            batched.append(time.perf_counter() - t0)
            assert hit is not None and hit.num_chunks == args.batch, "lookup missed"
        single = []
        chain = rnd.choice(chains)
        for h in tqdm(chain, desc="single-chunk loop", unit="call"):
            t0 = time.perf_counter()
            hit = client.lookup(reg.family_id, [h]).best()
            single.append(time.perf_counter() - t0)
            assert hit is not None
    b = latency_summary(batched, args.batch)
    s = latency_summary(single, 1)
    return {
        "benchmark": "lookup", "machine": machine(), "index_entries": entries,
        "batch_size": args.batch, **{k: b[k] for k in ("p50_ms", "p99_ms", "chunks_per_s")},
        "batched": b, "single": s,
        "speedup_chunks_per_s": round(b["chunks_per_s"] / s["chunks_per_s"], 1),
        "targets": {"p50_ms_max": TARGET_P50_MS, "chunks_per_s_min": TARGET_CHUNKS_PER_S,
                    "met": b["p50_ms"] <= TARGET_P50_MS and b["chunks_per_s"] >= TARGET_CHUNKS_PER_S},
        "_samples": {"batched_s": batched, "single_s": single},
    }


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, key in (("batched (%d hashes/call)" % doc["batch_size"], "batched_s"),
                      ("single hash/call", "single_s")):
        xs = np.sort(np.asarray(doc["_samples"][key]) * 1e3)
        ax.plot(xs, np.linspace(0, 1, xs.size), label=name)
    ax.axvline(TARGET_P50_MS, color="grey", ls="--", lw=1, label="p50 target (5 ms)")
    ax.set_xscale("log")
    ax.set_xlabel("latency per Lookup call (ms)")
    ax.set_ylabel("fraction of calls")
    ax.set_title(f"cachesvc Lookup, index of {doc['index_entries']:,} entries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> int:
    doc = run(args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(doc, png)
    doc.pop("_samples")
    doc["plot"] = str(png)
    write_json(out, doc)
    print(json.dumps(doc, indent=2))
    rows = [[mode, doc[mode]["chunks_per_call"], doc[mode]["p50_ms"], doc[mode]["p99_ms"],
             f"{doc[mode]['chunks_per_s']:,.0f}"] for mode in ("batched", "single")]
    print()
    print(markdown_table(["mode", "hashes/call", "p50 ms", "p99 ms", "chunks/s"], rows))
    print(f"\nindex: {doc['index_entries']:,} entries; targets (p50 ≤ {TARGET_P50_MS} ms, "
          f"≥ {TARGET_CHUNKS_PER_S:,} chunks/s) met: {doc['targets']['met']}")
    return 0

