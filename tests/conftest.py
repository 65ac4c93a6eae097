"""Shared fixtures: real ``cachesvc serve`` processes on free ports of 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from cachesvc_client import CacheClient, DType, EntryData, FamilySpec, Kind


@dataclass
class ServerProcess:
    """A cachesvc server in its own process. ``start`` waits until it serves."""

    workdir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def start(self) -> "ServerProcess":
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "cachesvc.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file), "--data-dir", str(self.data_dir),
               "--reservation-ttl-s", "3", *self.args]
        log = open(self.workdir / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 30 s")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    made: list[ServerProcess] = []

    def make(*args: str, workdir: Path | None = None) -> ServerProcess:
        wd = workdir or tmp_path / f"server{len(made)}"
        wd.mkdir(exist_ok=True)
        srv = ServerProcess(wd, list(args)).start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)


@pytest.fixture
def server(server_factory) -> ServerProcess:
    return server_factory("--memory-bytes", "256MiB")


@pytest.fixture
def client(server: ServerProcess) -> Iterator[CacheClient]:
    with CacheClient(server.address) as c:
        c.wait_ready()
        yield c


# ---------------------------------------------------------------- data helpers

TINY = FamilySpec(architecture="LlamaForCausalLM", num_layers=4, num_kv_heads=2, head_dim=8,
                  hidden_size=16, rope_theta=10000.0, rope_scaling_json="",
                  tokenizer_fingerprint="tiny-tok-v1", dtype=DType.BFLOAT16)


def make_entry(rng: np.random.Generator, family: FamilySpec, chunk_hash: bytes, num_tokens: int,
               kinds: tuple[Kind, ...] = (Kind.K, Kind.V, Kind.E), layers: range | None = None,
               position_offset: int = 0) -> EntryData:
    dtype = np.float32 if family.dtype == DType.FLOAT32 else ml_dtypes.bfloat16
    slabs = {}
    for layer in layers if layers is not None else range(family.num_layers):
        for kind in kinds:
            shape = family.slab_shape(kind, num_tokens)
            slabs[(kind, layer)] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return EntryData(chunk_hash, slabs, position_offset)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(int(os.environ.get("CACHESVC_TEST_SEED", "0")))
