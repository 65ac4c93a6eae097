"""Where the time of one reuse prefill goes: phase times, a profile of the unpipelined
path, and raw data-plane reads per transport. ``python tools/profile_reuse.py SHAPE TOKENS [DEVICE]``."""

from __future__ import annotations

import cProfile
import pstats
import random
import sys
import time

import torch

from cachesvc.wire.keys import Kind
from cachesvc_bench import synthetic
from cachesvc_bench.common import bench_server
from cachesvc_client import CacheClient
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    name, tokens = sys.argv[1], int(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
    shape = synthetic.SHAPES[name]
    _, model, tok = synthetic.pair(name, device)
    rng = random.Random(0)
    with bench_server("--memory-bytes", "16GiB", "--disk-mode", "off") as srv, \
            CacheClient(srv.address) as client:
        own = Producer(client, model, tok, "tuned")
        piped = Consumer(client, model, tok, "tuned", ConsumerOptions(producers=["tuned"]))
        serial = Consumer(client, model, tok, "tuned", ConsumerOptions(producers=["tuned"], pipelined=False))
        ids = [rng.randrange(shape.vocab) for _ in range(tokens + 16)]
        own.store(ids[:tokens])
        for consumer, label in ((piped, "pipelined"), (serial, "serial")):
            for i in range(3):
                sync(device)
                t0 = time.perf_counter()
                pre = consumer.prefill(ids)
                sync(device)
                r = pre.report
                print(f"{label} #{i}: {time.perf_counter() - t0:.4f} s  fetch {r.fetch_s:.4f} wait {r.wait_s:.4f} "
                      f"hidden {r.hidden_fraction:.2f} bytes {r.bytes_fetched / 1e6:.1f} MB via {r.transport}")
        t0 = time.perf_counter()
        with torch.no_grad():
            model.model(input_ids=torch.tensor([ids[:-1]], device=device), use_cache=True)
        sync(device)
        print(f"full prefill forward: {time.perf_counter() - t0:.4f} s")
        hashes = client.hash_tokens(ids, piped.family_id)
        hit = client.lookup(piped.family_id, hashes, consumer="tuned").hits[0]
        for transport in ("shm", "tcp", "grpc"):
            for _ in range(2):
                t0 = time.perf_counter()
                try:
                    slabs = client.get(piped.family_id, hit, (Kind.K, Kind.V), as_torch=True, transport=transport)
                except Exception as exc:   # noqa: BLE001 - report and go on
                    print(transport, "failed:", exc)
                    break
                dt = time.perf_counter() - t0
            print(f"get K,V via {transport}: {dt:.4f} s, {slabs.bytes_received / dt / 1e9:.2f} GB/s")
        for label, consumer in (("serial", serial), ("pipelined", piped)):
            prof = cProfile.Profile()
            prof.enable()
            consumer.prefill(ids)
            sync(device)
            prof.disable()
            print(f"---- profile ({label}; main thread only)")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
