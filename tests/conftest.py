"""Shared fixtures: real ``cachesvc serve`` processes on free ports of 127.0.0.1."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from cachesvc.node.launcher import ServerProcess
from cachesvc_client import CacheClient, DType, EntryData, FamilySpec, Kind


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    made: list[ServerProcess] = []

    def make(*args: str, workdir: Path | None = None) -> ServerProcess:
        wd = workdir or tmp_path / f"server{len(made)}"
        wd.mkdir(exist_ok=True)
        srv = ServerProcess(wd, ["--reservation-ttl-s", "3", *args]).start()
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
