"""``make demo``: start ``cachesvc serve`` with its embedded defaults, then as a client

1. register a model family with the SmolLM2-135M shape (30 layers, 3 KV heads × 64,
   hidden 576, bf16);
2. store a 16,384-token context as 64 entries × 30 layers × (K, V, E) × 256 tokens;
3. look it up, fetch it whole, and fetch only what a DroidSpeak plan needs (KV of layers
   0–19, E at layer 20), checking every byte against what was stored;
4. restart the server and read it back from the disk tier;
5. print the lookup and transfer figures, and stop the server.

Only the port (a free one) and the data directory (``.cachesvc-data/storage-demo``) are chosen
here, so the demo neither collides with a running server nor writes into your home.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from cachesvc.node.launcher import ServerProcess
from cachesvc_client import CacheClient, DType, EntryData, FamilySpec, Kind

SMOLLM2_SHAPE = FamilySpec(architecture="LlamaForCausalLM", num_layers=30, num_kv_heads=3,
                           head_dim=64, hidden_size=576, rope_theta=100000.0,
                           rope_scaling_json="", tokenizer_fingerprint="demo:smollm2-135m",
                           dtype=DType.BFLOAT16)
NUM_CHUNKS = 64


def start_server(data_dir: Path) -> ServerProcess:
    return ServerProcess(Path(tempfile.mkdtemp(prefix="cachesvc-demo-")), ("--log-format", "text"),
                         data_dir=data_dir).start()


def stop_server(server: ServerProcess) -> None:
    print(f"  server drained and exited with code {server.stop()}")


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def main() -> int:
    data_dir = Path(os.environ.get("CACHESVC_DEMO_DIR", ".cachesvc-data/storage-demo")).resolve()
    server = start_server(data_dir)
    address = server.address
    print(f"cachesvc serving on {address} (data dir {data_dir})")
    rng = np.random.default_rng(2026)
    try:
        with CacheClient(address) as client:
            reg = client.register_model("smollm2-135m-instruct", "9f" * 16, SMOLLM2_SHAPE)
            print(f"1. registered smollm2-135m-instruct: family {reg.family_id}, "
                  f"chunk size {reg.chunk_size}")
            tokens = rng.integers(0, 49152, NUM_CHUNKS * reg.chunk_size).tolist()
            hashes = client.hash_tokens(tokens, reg.family_id)
            entries = [EntryData(h, {(kind, layer): rng.standard_normal(
                SMOLLM2_SHAPE.slab_shape(kind, 256), dtype=np.float32).astype(ml_dtypes.bfloat16)
                for kind in Kind for layer in range(SMOLLM2_SHAPE.num_layers)}) for h in hashes]
            total = sum(a.nbytes for e in entries for a in e.slabs.values())
            t0 = time.perf_counter()
            put = client.put(reg.family_id, "smollm2-135m-instruct", entries)
            t_put = time.perf_counter() - t0
            print(f"2. put {len(tokens):,} tokens = {NUM_CHUNKS} entries × 30 layers × (K, V, E): "
                  f"{total / 1e6:.0f} MB in {t_put:.2f} s ({gbps(total, t_put)}); "
                  f"{put.entries_committed} committed")
            t0 = time.perf_counter()
            hit = client.lookup(reg.family_id, hashes, consumer="smollm2-135m-instruct").best()
            t_lookup = time.perf_counter() - t0
            print(f"3. lookup of {len(hashes)} chunk hashes: {t_lookup * 1e3:.2f} ms -> "
                  f"{hit.num_chunks} chunks hit from {hit.producer} (same model: {hit.same_model})")
            t0 = time.perf_counter()
            whole = client.get(reg.family_id, hit, (Kind.K, Kind.V, Kind.E))
            t_get = time.perf_counter() - t0
            _verify(whole, entries, range(30))
            print(f"   get whole (K, V, E, layers 0-29) over {whole.transport}: "
                  f"{whole.bytes_received / 1e6:.0f} MB in {t_get:.2f} s "
                  f"({gbps(whole.bytes_received, t_get)}), byte-identical")
            t0 = time.perf_counter()
            again = client.get(reg.family_id, hit, (Kind.K, Kind.V, Kind.E), out=whole.arrays)
            t_again = time.perf_counter() - t0
            _verify(again, entries, range(30))
            print(f"   again into the same buffers (as a serving engine reuses its KV memory): "
                  f"{t_again:.2f} s ({gbps(again.bytes_received, t_again)})")
            t0 = time.perf_counter()
            kv = client.get(reg.family_id, hit, (Kind.K, Kind.V), (0, 20))
            e20 = client.get(reg.family_id, hit, (Kind.E,), (20, 21))
            t_plan = time.perf_counter() - t0
            _verify(kv, entries, range(0, 20))
            _verify(e20, entries, range(20, 21))
            moved = kv.bytes_received + e20.bytes_received
            print(f"   get for a plan (KV of layers 0-19 + E at layer 20): {moved / 1e6:.0f} MB "
                  f"({moved / total:.0%} of the entry set) in {t_plan:.2f} s, byte-identical")
    finally:
        stop_server(server)
    server = start_server(data_dir)
    try:
        with CacheClient(server.address) as client:
            hit = client.lookup(reg.family_id, hashes).best()
            t0 = time.perf_counter()
            back = client.get(reg.family_id, hit, (Kind.K, Kind.V, Kind.E))
            t_disk = time.perf_counter() - t0
            _verify(back, entries, range(30))
            tiers = "disk" if set(hit.tiers) == {2} else "memory+disk"
            print(f"4. after a restart: {hit.num_chunks} chunks found ({tiers} tier), "
                  f"{back.bytes_received / 1e6:.0f} MB read back in {t_disk:.2f} s "
                  f"({gbps(back.bytes_received, t_disk)}), checksum-clean and byte-identical")
            stats = client.stats()
            print(f"5. server stats: {stats['entries']} entries, disk {stats['disk']['used_bytes'] / 1e6:.0f} MB "
                  f"of {stats['disk']['capacity_bytes'] / 1e9:.0f} GB, memory budget "
                  f"{stats['memory']['capacity_bytes'] / 2**30:.1f} GiB")
            client.delete(reg.family_id, chunk_hashes=hashes)   # leave the data dir empty
    finally:
        stop_server(server)
    return 0


def _verify(got, entries, layers) -> None:
    assert got.complete and got.valid_chunks == len(entries), got.missing[:3]
    start = layers.start
    for i, entry in enumerate(entries):
        for (kind, layer), arr in entry.slabs.items():
            if kind in got.arrays and layer in layers:
                dest = got.arrays[kind][layer - start, i * 256:(i + 1) * 256]
                if dest.tobytes() != arr.tobytes():
                    raise SystemExit(f"MISMATCH in entry {i} {kind.name} layer {layer}")


if __name__ == "__main__":
    sys.exit(main())
