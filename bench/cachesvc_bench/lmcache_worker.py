"""Runs inside LMCache's own virtualenv (``make lmcache-venv``), not ours: LMCache 0.5.6's
``lm://`` server (``python -m lmcache.v1.server``) and its own client
(``LMCServerConnector``) move ``--chunks`` chunks of ``--chunk-bytes`` (KV_2LTD, bf16).
Prints one JSON line: best-of-``--repeats`` ``put_gbps`` and ``get_gbps``.

PUT has no reply in the lm:// protocol, so a put round ends with an EXIST of the last
key, which the server answers only after it has taken every earlier PUT on that
connection (it serves a connection's requests in order).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_allocators.mixed_memory_allocator import MixedMemoryAllocator
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("LMCache server did not start")


async def _put_all(conn, keys, objs) -> bool:
    for key, obj in zip(keys, objs, strict=True):
        await conn.put(key, obj)
    return await conn.exists(keys[-1])


async def _get_all(conn, keys) -> list:
    return [await conn.get(key) for key in keys]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, required=True)
    ap.add_argument("--chunk-bytes", type=int, default=4 << 20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(port), "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port)
        meta = LMCacheMetadata(model_name="bench", world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=(1, 2, 256, 1, 1))
        backend = LocalCPUBackend(LMCacheEngineConfig.from_defaults(chunk_size=256, local_cpu=False),
                                  metadata=meta, memory_allocator=MixedMemoryAllocator(
                                      2 * args.chunks * args.chunk_bytes + (64 << 20)))
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        conn = LMCServerConnector("127.0.0.1", port, loop, backend)
        shape = torch.Size([2, 1, 256, args.chunk_bytes // (2 * 256 * 2)])
        objs = []
        for i in range(args.chunks):
            obj = backend.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD)
            obj.tensor.fill_(i)
            objs.append(obj)
        run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result()  # noqa: E731
        best_put = best_get = float("inf")
        for r in range(args.repeats + 1):      # round 0 warms up
            keys = [CacheEngineKey("bench", 1, 0, r * 10**6 + i, torch.bfloat16)
                    for i in range(args.chunks)]

            t0 = time.perf_counter()
            assert run(_put_all(conn, keys, objs))
            best_put = min(best_put, time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = run(_get_all(conn, keys))
            best_get = min(best_get, time.perf_counter() - t0)
            assert all(g is not None for g in got) and got[-1].tensor.flatten()[0].item() == args.chunks - 1
            for g in got:
                g.ref_count_down()
        total = args.chunks * args.chunk_bytes
        print(json.dumps({"put_gbps": round(total / best_put / 1e9, 3),
                          "get_gbps": round(total / best_get / 1e9, 3), "size_bytes": total,
                          "chunks": args.chunks, "chunk_bytes": args.chunk_bytes}))
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
