"""Runs inside LMCache's own virtualenv (``make lmcache-venv``), not ours: LMCache 0.5.6's
own ``lm://`` client (``LMCServerConnector``) against an ``lm://`` server, ours
(``--address HOST:PORT``, a node started with ``--lm-port``) or LMCache's own
(``python -m lmcache.v1.server``, started here when no address is given).

Commands (each prints one JSON line):

- ``bench``: best-of-``--repeats`` ``put_gbps`` and ``get_gbps`` over ``--chunks`` chunks
  of ``--chunk-bytes`` (KV_2LTD, bf16);
- ``put``: stores ``--chunks`` chunks whose bytes follow from ``--seed``;
- ``check``: gets them back and counts ``identical``, ``missing`` and ``wrong`` chunks;
- ``l2-lock``: drives our L2 adapter plugin (cachesvc_connectors.lmcache.l2_adapter) the
  way LMCache's storage controllers do, against a node with a small memory tier: a
  locked chunk must survive eviction pressure and load byte-identical, and be evictable
  once unlocked;
- ``l2-dead``: the adapter against an address nothing listens on: every task completes,
  as a failure or a miss, and nothing raises.

PUT has no reply in the lm:// protocol, so a put round ends with an EXIST of the last
key, which a server answers only after it has taken every earlier PUT on that
connection (both servers serve a connection's requests in order).
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

TOKENS = 256    # LMCache's chunk size
LAYERS = 2


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


class Client:
    """LMCache's connector with the CPU backend it allocates received chunks from."""

    def __init__(self, host: str, port: int, chunks: int, chunk_bytes: int, model: str) -> None:
        self.model = model
        self.shape = torch.Size([2, LAYERS, TOKENS, chunk_bytes // (2 * LAYERS * TOKENS * 2)])
        meta = LMCacheMetadata(model_name=model, world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=(LAYERS, 2, TOKENS, 1, 1))
        self.backend = LocalCPUBackend(LMCacheEngineConfig.from_defaults(chunk_size=TOKENS, local_cpu=False),
                                       metadata=meta, memory_allocator=MixedMemoryAllocator(
                                           2 * chunks * chunk_bytes + (64 << 20)))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.conn = LMCServerConnector(host, port, self.loop, self.backend)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def key(self, i: int) -> CacheEngineKey:
        return CacheEngineKey(self.model, 1, 0, i * 0x9E3779B1 - (1 << 40), torch.bfloat16)

    def chunk(self, seed: int, i: int):
        obj = self.backend.allocate(self.shape, torch.bfloat16, MemoryFormat.KV_2LTD)
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        obj.tensor.view(torch.int16).copy_(torch.randint(-32768, 32767, self.shape, generator=gen,
                                                         dtype=torch.int16))
        return obj

    async def put_all(self, keys, objs) -> bool:
        for key, obj in zip(keys, objs, strict=True):
            await self.conn.put(key, obj)
        return await self.conn.exists(keys[-1])

    async def get_all(self, keys) -> list:
        return [await self.conn.get(key) for key in keys]


def bench(client: Client, args: argparse.Namespace) -> dict:
    objs = [client.chunk(0, i) for i in range(args.chunks)]
    best_put = best_get = float("inf")
    for r in range(args.repeats + 1):      # round 0 warms up
        keys = [client.key(r * 10**6 + i) for i in range(args.chunks)]
        t0 = time.perf_counter()
        assert client.run(client.put_all(keys, objs))
        best_put = min(best_put, time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = client.run(client.get_all(keys))
        best_get = min(best_get, time.perf_counter() - t0)
        assert all(g is not None for g in got)
        assert torch.equal(got[-1].tensor.view(torch.int16), objs[-1].tensor.view(torch.int16))
        for g in got:
            g.ref_count_down()
    total = args.chunks * args.chunk_bytes
    return {"put_gbps": round(total / best_put / 1e9, 3), "get_gbps": round(total / best_get / 1e9, 3),
            "size_bytes": total, "chunks": args.chunks, "chunk_bytes": args.chunk_bytes}


def put(client: Client, args: argparse.Namespace) -> dict:
    keys = [client.key(i) for i in range(args.chunks)]
    for start in range(0, args.chunks, 16):   # 16 at a time: bounded client memory
        objs = [client.chunk(args.seed, i) for i in range(start, min(start + 16, args.chunks))]
        assert client.run(client.put_all(keys[start:start + 16], objs))
        for o in objs:
            o.ref_count_down()
    return {"stored": args.chunks}


def check(client: Client, args: argparse.Namespace) -> dict:
    identical = missing = wrong = 0
    for i in range(args.chunks):
        got = client.run(client.conn.get(client.key(i)))
        if got is None:
            missing += 1
            continue
        want = client.chunk(args.seed, i)
        same = (got.tensor.shape == want.tensor.shape and got.get_memory_format() == MemoryFormat.KV_2LTD and
                torch.equal(got.tensor.view(torch.int16), want.tensor.view(torch.int16)))
        identical += same
        wrong += not same
        got.ref_count_down()
        want.ref_count_down()
    exists = client.run(client.conn.exists(client.key(0)))
    return {"identical": identical, "missing": missing, "wrong": wrong, "exists_first": exists}


def _l2_object(seed: int, i: int):
    """A KV_2LTD bf16 chunk of 512 KiB (2 x 2 layers x 256 tokens x 256) outside any allocator."""
    from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj
    shape = torch.Size([2, 2, TOKENS, 256])
    raw = torch.randint(-32768, 32767, shape, generator=torch.Generator().manual_seed(seed * 1000 + i),
                        dtype=torch.int16).view(torch.bfloat16)
    meta = MemoryObjMetadata(shape=shape, dtype=torch.bfloat16, address=raw.data_ptr(),
                             phy_size=raw.numel() * 2, fmt=MemoryFormat.KV_2LTD, ref_count=1)
    return TensorMemoryObj(raw, meta, parent_allocator=None)


class L2Driver:
    """Submits to an L2 adapter and waits on its event fds, as LMCache's controllers do."""

    def __init__(self, address: str) -> None:
        from lmcache.v1.distributed.api import ObjectKey
        from cachesvc_connectors.lmcache.l2_adapter import CachesvcL2Adapter
        self.adapter = CachesvcL2Adapter({"address": address, "timeout_s": 5})
        self.key = lambda i: ObjectKey(chunk_hash=i.to_bytes(8, "little") * 4, model_name="l2-test", kv_rank=0)

    def _wait(self, fd: int) -> None:
        import select
        from lmcache.v1.platform import consume_fd
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        assert poll.poll(30_000), "no completion signalled"
        consume_fd(fd)

    def store(self, ids, seed: int) -> bool:
        task = self.adapter.submit_store_task([self.key(i) for i in ids], [_l2_object(seed, i) for i in ids])
        self._wait(self.adapter.get_store_event_fd())
        return self.adapter.pop_completed_store_tasks()[task].is_successful()

    def lookup(self, ids) -> list[bool]:
        task = self.adapter.submit_lookup_and_lock_task([self.key(i) for i in ids], {})
        self._wait(self.adapter.get_lookup_and_lock_event_fd())
        bitmap = self.adapter.query_lookup_and_lock_result(task)
        return [bitmap.test(j) for j in range(len(ids))]

    def load(self, ids, seed: int) -> list[str]:
        bufs = [_l2_object(999, i) for i in ids]
        task = self.adapter.submit_load_task([self.key(i) for i in ids], bufs)
        self._wait(self.adapter.get_load_event_fd())
        bitmap = self.adapter.query_load_result(task)
        out = []
        for j, i in enumerate(ids):
            same = torch.equal(bufs[j].tensor.view(torch.int16), _l2_object(seed, i).tensor.view(torch.int16))
            out.append("miss" if not bitmap.test(j) else "identical" if same else "wrong")
        return out


def l2_lock(args: argparse.Namespace) -> dict:
    drv = L2Driver(args.address)
    out = {"stored": drv.store([0], args.seed), "locked": drv.lookup([0])}
    pressure = [drv.store(range(k, k + 4), args.seed) for k in range(100, 148, 4)]   # 24 MiB through the node
    out["locked_load"] = drv.load([0], args.seed)
    drv.adapter.submit_unlock([drv.key(0)])
    drv.lookup([1])   # never stored: locks nothing; the lookup worker took the unlock before it
    for k in range(200, 248, 4):
        drv.store(range(k, k + 4), args.seed)
    out["after_unlock"] = drv.lookup([0])
    out["pressure_stores_ok"] = sum(pressure)
    out["status"] = {k: v for k, v in drv.adapter.report_status().items() if k in ("is_healthy", "unlock_failures")}
    drv.adapter.close()
    return out


def l2_dead(args: argparse.Namespace) -> dict:
    drv = L2Driver(args.address)
    out = {"stored": drv.store([0, 1], args.seed), "lookup": drv.lookup([0, 1]), "load": drv.load([0, 1], args.seed)}
    drv.adapter.submit_unlock([drv.key(0)])
    out["healthy"] = drv.adapter.report_status()["is_healthy"]
    drv.adapter.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=("bench", "put", "check", "l2-lock", "l2-dead"))
    ap.add_argument("--address", default="", help="HOST:PORT of an lm:// server (default: start LMCache's own)")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--chunk-bytes", type=int, default=4 << 20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="bench")
    args = ap.parse_args()
    if args.command.startswith("l2-"):
        print(json.dumps({"l2-lock": l2_lock, "l2-dead": l2_dead}[args.command](args)))
        return
    server = None
    if args.address:
        host, port = args.address.rsplit(":", 1)
    else:
        host, port = "127.0.0.1", str(_free_port())
        server = subprocess.Popen([sys.executable, "-m", "lmcache.v1.server", host, port, "cpu"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(int(port))
        held = args.chunks if args.command == "bench" else 16   # chunks held at once
        client = Client(host, int(port), held, args.chunk_bytes, args.model)
        print(json.dumps({"bench": bench, "put": put, "check": check}[args.command](client, args)))
    finally:
        if server is not None:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
