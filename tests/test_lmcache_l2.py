"""Our LMCache L2 adapter plugin (issue 14, part 3), driven by LMCache 0.5.6's own code in
its own virtualenv: its ``test_l2_adapter`` check (store → lookup-and-lock → load →
unlock, byte-identical), and the controllers' submit/eventfd pattern for locks and a
dead node (bench/cachesvc_bench/lmcache_worker.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.test_lmcache_endpoint import LMCACHE_PYTHON, WORKER


def _in_lmcache(*cmd: str) -> str:
    if not LMCACHE_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{LMCACHE_PYTHON} missing in CI: make test builds it (make lmcache-venv)")
        pytest.skip("LMCache's virtualenv is not built (make lmcache-venv)")
    proc = subprocess.run([str(LMCACHE_PYTHON), *cmd], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LMCACHE_DISABLE_BANNER": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _adapter_json(address: str) -> str:
    return json.dumps({"type": "plugin", "module_path": "cachesvc_connectors.lmcache.l2_adapter",
                       "class_name": "CachesvcL2Adapter", "adapter_params": {"address": address}})


def test_lmcache_check_mode_round_trip_is_byte_identical(server_factory):
    srv = server_factory("--memory-bytes", "64MiB", "--lm-port", "0")
    out = _in_lmcache("-m", "lmcache.v1.basic_check", "--mode", "test_l2_adapter", "--num-keys", "8",
                      "--l2-adapter", _adapter_json(f"127.0.0.1:{srv.serving('lm_port')}"))
    assert "Testing L2 adapter #0 (CachesvcL2Adapter)" in out, out
    for phase in ("correctly absent", "found", r"Validation \(loaded\)", r"Validation \(content\)"):
        assert re.search(phase + r":? 8/8" if "Validation" in phase else r"8/8 " + phase, out), (phase, out)
    assert "Batch store OK" in out
    assert "Test Failed" not in out and "mismatch" not in out


def test_a_locked_chunk_survives_eviction_and_is_evictable_once_unlocked(server_factory):
    srv = server_factory("--memory-bytes", "8MiB", "--disk-mode", "off", "--lm-port", "0")
    out = json.loads(_in_lmcache(str(WORKER), "l2-lock", "--address", f"127.0.0.1:{srv.serving('lm_port')}")
                     .strip().splitlines()[-1])
    assert out["stored"] and out["locked"] == [True]
    assert out["locked_load"] == ["identical"]     # 24 MiB went through an 8 MiB node meanwhile
    assert out["after_unlock"] == [False]           # the same pressure evicts it once unlocked
    assert out["status"] == {"is_healthy": True, "unlock_failures": 0}


def test_a_dead_node_is_a_failed_store_and_misses(tmp_path):
    out = json.loads(_in_lmcache(str(WORKER), "l2-dead", "--address", "127.0.0.1:1").strip().splitlines()[-1])
    assert out == {"stored": False, "lookup": [False, False], "load": ["miss", "miss"], "healthy": False}
