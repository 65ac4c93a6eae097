"""The package map (docs/design.md) holds: the SDK and connectors load no node module, the
node's command line loads no torch, tqdm, matplotlib, SDK, connector, lab or benchmark
module, the wire package loads nothing of the node, and the engine-neutral reuse package
imports with torch and transformers unavailable. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NODE = ("cachesvc.node",)
HEAVY = ("torch", "transformers", "tqdm", "matplotlib")
ABOVE_NODE = ("cachesvc_client", "cachesvc_connectors", "cachesvc_bench", "cachesvc_lab")


def _loaded_after(code: str, block: tuple[str, ...] = (), python: str = sys.executable) -> list[str]:
    """The modules loaded after running ``code`` in a fresh interpreter (of ``python``) in
    which the modules ``block`` names cannot be imported."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in block)
    probe = prelude + code + "\nimport json; print(json.dumps(sorted(m for m in sys.modules if sys.modules[m])))"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def _under(modules: list[str], roots: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == r or m.startswith(r + ".") for r in roots)]


def test_sdk_and_hf_connector_load_no_node_module():
    loaded = _loaded_after("import cachesvc_client, cachesvc_connectors.hf")
    assert "cachesvc_connectors.hf.consumer" in loaded        # the probe can see what it loads
    assert _under(loaded, NODE) == []


def test_the_wire_package_loads_nothing_of_the_node_or_above():
    loaded = _loaded_after("import cachesvc.wire.keys, cachesvc.wire.layout, cachesvc.wire.convert, "
                           "cachesvc.wire.framing, cachesvc.wire.protocol, cachesvc.wire.ucxlib, "
                           "cachesvc.wire.errors, cachesvc.wire.lmwire")
    assert _under(loaded, NODE + ABOVE_NODE + HEAVY) == []


@pytest.mark.parametrize("argv", [None, ["serve", "--port", "0"], ["stats"], ["ls", "--models"]])
def test_the_node_command_line_loads_only_the_node(argv):
    code = "from cachesvc.node import cli\n" + (f"parser = cli.build_parser({argv!r})\n" if argv else "")
    loaded = _loaded_after(code)
    assert "cachesvc.node.cli" in loaded
    assert _under(loaded, HEAVY + ABOVE_NODE) == []


def test_the_full_help_imports_the_registered_commands_but_nothing_heavy():
    loaded = _loaded_after("from cachesvc.node import cli\nparser = cli.build_parser([])\n")
    assert "cachesvc_lab.profile_cmd" in loaded and "cachesvc_bench.cli" in loaded
    assert _under(loaded, HEAVY + ("cachesvc_client", "cachesvc_connectors")) == []


def test_the_reuse_package_needs_neither_torch_nor_transformers():
    loaded = _loaded_after("import cachesvc_connectors.reuse as r\n"
                           "p = r.Plan.parse('[2,4)', 8)\n"
                           "assert p.recomputed_layers == 2\n", block=("torch", "transformers"))
    assert "cachesvc_connectors.reuse.planner" in loaded
    assert _under(loaded, ("torch", "transformers", *NODE)) == []


def test_registered_commands_are_listed_and_run():
    out = subprocess.run([sys.executable, "-m", "cachesvc.node.cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    for command in ("serve", "stats", "ls", "profile", "bench"):
        assert command in out.stdout
    bench = subprocess.run([sys.executable, "-m", "cachesvc.node.cli", "bench", "--help"],
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0 and "lookup" in bench.stdout and "--json" in bench.stdout


@pytest.mark.parametrize("venv, module", [(".vllm", "cachesvc_connectors.vllm.connector"),
                                          (".lmcache", "cachesvc_connectors.lmcache.l2_adapter")])
def test_the_engine_plugins_load_no_node_module(venv, module):
    """They run inside vLLM's and LMCache's processes, in those engines' virtualenvs."""
    python = Path(__file__).parents[1] / venv / "venv" / "bin" / "python"
    if not python.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{python} missing in CI: make test builds it")
        pytest.skip(f"{python} is not built")
    loaded = _loaded_after(f"import {module}", python=str(python))
    assert module in loaded
    assert _under(loaded, NODE) == []
