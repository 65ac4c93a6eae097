"""A wheel built from the repository holds every package, the shipped adapters and the
command registrations, and works from a fresh virtualenv: ``cachesvc serve`` serves,
``cachesvc profile --help`` and ``cachesvc bench --help`` answer, the demo's imports load.

The fresh virtualenv gets the wheel itself (``--no-deps``); its dependencies come from
the project's virtualenv through a ``.pth`` line, so the test downloads nothing but the
build backend. A ``.pth`` line adds a folder without running the ``.pth`` files inside it,
so the project's editable install is not visible there: every cachesvc module the test
loads must come from the wheel (checked)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with the repository's wheel installed; returns its bin folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from the files a clone has (tracked, or new and not ignored), not the working
    # folder: setuptools' build/ there can hold modules deleted since.
    source = tmp / "src"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (tmp / "dist").glob("cachesvc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("cachesvc/wire/keys.py", "cachesvc/node/store.py", "cachesvc/v1/cachesvc_pb2.py",
                 "cachesvc_client/client.py", "cachesvc_connectors/reuse/profile.py",
                 "cachesvc_connectors/hf/consumer.py", "cachesvc_bench/cli.py", "cachesvc_lab/demo.py",
                 "cachesvc_lab/adapters/codes-upper.safetensors", "cachesvc_lab/adapters/codes-all.json"):
        assert must in names, f"{must} missing from the wheel"
    assert not any(n.startswith("tests/") for n in names)
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    site = subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return bin_dir


def _run(bin_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          cwd=bin_dir.parent, env={**os.environ, "PYTHONPATH": ""})


def test_commands_answer_from_the_wheel(installed):
    for command, flag in (("profile", "--producer"), ("bench", "--json")):
        out = _run(installed, "cachesvc", command, "--help")
        assert out.returncode == 0 and flag in out.stdout, out.stderr[-3000:]


def test_modules_come_from_the_wheel_and_the_demo_imports(installed):
    code = ("import cachesvc, cachesvc_client, cachesvc_connectors.hf, cachesvc_connectors.reuse, cachesvc_lab.demo, "
            "cachesvc_bench.plan; from cachesvc_lab import finetune; "
            "print(cachesvc.__file__); print(cachesvc_lab.demo.__file__); "
            "print(len(finetune.shipped('codes-upper')[1]['adapter_sha256']))")
    out = _run(installed, "python", "-c", code, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert all(str(installed.parent) in line for line in lines[:2]) and lines[2] == "64"


def test_serve_from_the_wheel(installed, tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen([str(installed / "cachesvc"), "serve", "--host", "127.0.0.1", "--port", "0",
                             "--port-file", str(port_file), "--data-dir", str(tmp_path / "data"),
                             "--memory-bytes", "64MiB"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=installed.parent)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "cachesvc serve did not start"
            time.sleep(0.05)
        port = port_file.read_text().strip()
        stats = _run(installed, "cachesvc", "stats", "--target", f"127.0.0.1:{port}")
        assert stats.returncode == 0 and '"chunk_size": 256' in stats.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
