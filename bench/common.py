"""Shared benchmark plumbing: a real server process, machine facts, result output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil


@dataclass
class BenchServer:
    """``cachesvc serve`` in a child process on a free port of 127.0.0.1."""

    args: Sequence[str]
    proc: subprocess.Popen | None = None
    port: int = 0
    workdir: Path | None = None

    def __enter__(self) -> "BenchServer":
        self.workdir = Path(tempfile.mkdtemp(prefix="cachesvc-bench-"))
        port_file = self.workdir / "port"
        cmd = [sys.executable, "-m", "cachesvc.cli", "serve", "--port", "0", "--port-file",
               str(port_file), "--data-dir", str(self.workdir / "data"), "--log-level", "warning",
               *self.args]
        self.proc = subprocess.Popen(cmd, stderr=open(self.workdir / "server.log", "wb"))
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {self.workdir / 'server.log'}")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(30)


def machine() -> dict:
    return {"host": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def latency_summary(samples_s: Sequence[float], chunks_per_call: int) -> dict:
    arr = np.asarray(samples_s)
    return {"calls": int(arr.size), "chunks_per_call": chunks_per_call,
            "p50_ms": round(float(np.percentile(arr, 50)) * 1e3, 4),
            "p99_ms": round(float(np.percentile(arr, 99)) * 1e3, 4),
            "mean_ms": round(float(arr.mean()) * 1e3, 4),
            "chunks_per_s": round(chunks_per_call * arr.size / float(arr.sum()), 1)}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, doc: dict) -> None:
    Path(path).write_text(json.dumps(doc, indent=2))
