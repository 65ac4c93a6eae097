"""LMCache 0.5.6 against cachesvc, in LMCache's own virtualenv (``make lmcache-venv``), for
``cachesvc bench dataplane`` (its ``lmcache`` section):

- **lm:// servers**: LMCache's own client (``LMCServerConnector``) against LMCache's own
  server (``python -m lmcache.v1.server``) and against a node's ``--lm-port``, on the same
  chunks (64 and 256 MiB of 4 MiB KV_2LTD chunks), best of ``--repeats``;
- **100 chunks of 4 MiB**: stored through our endpoint, read back (byte-identical?),
  the node restarted from its disk tier, read back again;
- **L2 adapters**: ``lmcache bench l2`` (LMCache's own benchmark, verification on) with
  our plugin against a node, and with LMCache's own ``fs`` adapter on tmpfs (memory,
  no network: the local baseline).

Every figure comes from LMCache's code timing itself; none of ours times LMCache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cachesvc_bench.ceilings import socket_gbps
from cachesvc_bench.common import bench_server

WORKER = Path(__file__).with_name("lmcache_worker.py")
SIZES = (("64MiB", 16), ("256MiB", 64))


def _worker(python: Path, *args: str) -> dict:
    proc = subprocess.run([str(python), str(WORKER), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    if proc.returncode != 0:
        # The error, not LMCache's log lines (coloured "[time] LMCache LEVEL: ..."), which
        # can follow it as objects are collected at exit.
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("\x1b[", "["))]
        raise RuntimeError(lines[-1] if lines else "worker failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lm_node(*args: str):
    # Prefaulted, as a production node runs (puts into never-touched memory measure page faults).
    return bench_server("--memory-bytes", "1GiB", "--memory-prefault", "true", "--lm-port", "0",
                        "--log-level", "info", *args)


def lm_servers(python: Path, repeats: int) -> list[dict]:
    """Both lm:// servers on the same sizes."""
    rows = []
    with _lm_node("--disk-mode", "off") as srv:
        ours = f"127.0.0.1:{srv.serving('lm_port')}"
        for label, chunks in SIZES:
            own = _worker(python, "bench", "--chunks", str(chunks), "--repeats", str(repeats))
            lm = _worker(python, "bench", "--address", ours, "--chunks", str(chunks), "--repeats", str(repeats))
            # Both servers answer an unmodified LMCache client over loopback TCP: a raw stream of
            # the same bytes between two processes is what either can reach at best.
            ceiling = socket_gbps(chunks * (4 << 20))
            rows.append({"request": label, "tcp_ceiling_gbps": round(ceiling, 3),
                         "lm_get_of_ceiling": round(lm["get_gbps"] / ceiling, 2),
                         "get_gbps": own["get_gbps"], "put_gbps": own["put_gbps"],
                         "lm_get_gbps": lm["get_gbps"], "lm_put_gbps": lm["put_gbps"],
                         "lm_get_vs_lmcache": round(lm["get_gbps"] / own["get_gbps"], 2),
                         "lm_put_vs_lmcache": round(lm["put_gbps"] / own["put_gbps"], 2)})
    return rows


def hundred_chunks(python: Path) -> dict:
    """The 4 MiB-chunk target: stored, read back, read back after a restart."""
    common = ("--chunks", "100", "--chunk-bytes", str(4 << 20), "--seed", "11")
    srv = _lm_node("--disk-mode", "write_through")
    with srv:
        address = f"127.0.0.1:{srv.serving('lm_port')}"
        _worker(python, "put", "--address", address, *common)
        before = _worker(python, "check", "--address", address, *common)
    with srv:   # same data directory: the disk tier is all that is left
        after = _worker(python, "check", "--address", f"127.0.0.1:{srv.serving('lm_port')}", *common)
    shutil.rmtree(srv.workdir, ignore_errors=True)
    return {"chunks": 100, "chunk_bytes": 4 << 20, "identical": before["identical"], "wrong": before["wrong"],
            "missing": before["missing"], "identical_after_restart": after["identical"],
            "wrong_after_restart": after["wrong"]}


def _l2_bench(python: Path, adapter: dict) -> dict:
    out = Path(tempfile.mkdtemp(prefix="cachesvc-l2-")) / "l2.json"
    cmd = [str(python.with_name("lmcache")), "bench", "l2", "--l2-adapter", json.dumps(adapter),
           "--num-keys", "32", "--data-size-kb", "4096", "--rounds", "3", "--no-skip-verify",
           "--lookup-max-hit-rate", "1.0", "--format", "json", "--output", str(out), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "LMCACHE_DISABLE_BANNER": "1"})
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"lmcache bench l2 failed: {proc.stderr.strip().splitlines()[-1:]}")
    ops = {v["operation"].lower(): v for k, v in json.loads(out.read_text())["metrics"].items()
           if k.startswith("op_")}
    shutil.rmtree(out.parent, ignore_errors=True)
    return {f"{op}_mbps": ops[op]["throughput_avg_mbps"] for op in ("store", "load")} | \
        {f"{op}_ok": f"{ops[op]['total_success']}/{ops[op]['total_keys']}" for op in ("store", "lookup", "load")} | \
        {"lookup_ms": ops["lookup"]["duration_avg_ms"]}


def l2_adapters(python: Path) -> dict:
    with _lm_node("--disk-mode", "off") as srv:
        ours = _l2_bench(python, {"type": "plugin", "module_path": "cachesvc_connectors.lmcache.l2_adapter",
                                  "class_name": "CachesvcL2Adapter",
                                  "adapter_params": {"address": f"127.0.0.1:{srv.serving('lm_port')}"}})
    tmpfs = Path(tempfile.mkdtemp(prefix="lmcache-fs-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        fs = _l2_bench(python, {"type": "fs", "base_path": str(tmpfs)})
    finally:
        shutil.rmtree(tmpfs, ignore_errors=True)
    return {"cachesvc": ours, "lmcache_fs_tmpfs": fs,
            "load_vs_fs": round(ours["load_mbps"] / fs["load_mbps"], 2),
            "store_vs_fs": round(ours["store_mbps"] / fs["store_mbps"], 2)}


def lmcache_section(python: Path, repeats: int, shm_rows: list[dict]) -> dict:
    """The ``lmcache`` section of ``bench dataplane``; "not run" when LMCache is absent."""
    if not python.exists():
        return {"status": f"not run: {python} missing (make lmcache-venv builds it)", "get_gbps": None,
                "put_gbps": None, "sizes": []}
    try:
        sizes = lm_servers(python, repeats)
        for size in sizes:   # our same-host path on the same sizes, for reference
            ours = {r["op"]: r["gbps"] for r in shm_rows if r["path"] == "shm" and r["request"] == size["request"]}
            size["shm_get_vs_lmcache"] = round(ours["get"] / size["get_gbps"], 2) if "get" in ours else None
            size["shm_put_vs_lmcache"] = round(ours["put"] / size["put_gbps"], 2) if "put" in ours else None
        head = sizes[-1]   # LMCache's own server at the largest size (the fields earlier runs had)
        return {"status": "ok: lmcache 0.5.6 (LMCServerConnector; lmcache.v1.server; lmcache bench l2)",
                "get_gbps": head["get_gbps"], "put_gbps": head["put_gbps"], "request": head["request"],
                "sizes": sizes, "chunks_4mib": hundred_chunks(python), "l2": l2_adapters(python)}
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"status": f"failed: {exc}", "get_gbps": None, "put_gbps": None, "sizes": []}
