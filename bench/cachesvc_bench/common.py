"""Shared benchmark plumbing: a real server process, machine facts, result output."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import psutil

from cachesvc.node.launcher import ServerProcess


def bench_server(*args: str) -> ServerProcess:
    """A quiet ``cachesvc serve`` in a fresh temporary directory (use with ``with``)."""
    workdir = Path(tempfile.mkdtemp(prefix="cachesvc-bench-"))
    return ServerProcess(workdir, ["--log-level", "warning", *args])


def model_server(device: str, cpu_memory: str = "2GiB", *args: str) -> ServerProcess:
    """A memory-only bench server for the model benchmarks: 24 GiB of memory tier on a GPU
    host (the large synthetic shapes' slabs), ``cpu_memory`` otherwise; ``args``: more flags."""
    return bench_server("--memory-bytes", "24GiB" if device.startswith("cuda") else cpu_memory,
                        "--disk-mode", "off", *args)


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


def finish(json_path: str | Path, doc: dict, plot: Callable[[dict, Path], None], header: Sequence[str],
           rows: Sequence[Sequence[object]]) -> int:
    """A benchmark's ending: the plot and JSON (``publish``), then its markdown table and
    where the plot is. The exit status (0)."""
    png = publish(json_path, doc, plot)
    print(markdown_table(header, rows))
    print(f"\nplot: {png}")
    return 0


def publish(json_path: str | Path, doc: dict, plot: Callable[[dict, Path], None]) -> Path:
    """Plot next to the JSON (same name, .png), write the JSON, print it; the plot's path."""
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(doc, png)
    doc["plot"] = str(png)
    write_json(out, doc)
    print(json.dumps(doc, indent=2))
    return png
