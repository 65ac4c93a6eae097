"""tools/gpu-check.sh runs only on a lent GPU machine, for minutes of a 15-minute budget,
where a renamed flag or a stale wheel pin would waste the lease. Its benchmark command
lines are parsed here by the benchmarks' own parser, the models and tests they name must
exist, and the wheels `make gpu-wheels` fetches must be the versions pyproject.toml pins."""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from cachesvc_bench import cli, synthetic

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu-check.sh"


def _commands(text: str, program: str) -> list[list[str]]:
    """The argument lists after ``program`` in a shell script's commands: continuation
    lines joined, ``${NAME:-default}`` taken at its default, redirections dropped."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("#") or program not in line:
            continue
        line = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line).replace("$OUT", "/tmp/gpu-check")
        words = shlex.split(re.split(r"\s[0-9]?>|\s\|", line)[0])
        at = words.index(program.split()[-1])
        commands.append(words[at + 1:])
    return commands


def _bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    cli.add_arguments(parser)
    return parser


def test_every_benchmark_the_gpu_check_runs_parses_and_names_known_models():
    commands = _commands(SCRIPT.read_text(), "python3 -m cachesvc_bench")
    assert {argv[0] for argv in commands} == {"overhead", "reuse", "agents"}
    parser = _bench_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.device == "cuda" and args.json.startswith("/tmp/gpu-check/"), argv
        for names in (args.synthetic, args.unaligned):
            assert not names or set(names.split(",")) <= set(synthetic.SHAPES), argv
        if args.bench == "agents":
            assert args.model in synthetic.SHAPES, argv


def test_the_parser_check_would_catch_a_renamed_flag():
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _bench_parser().parse_args(["reuse", "--json", "x", "--device", "cuda", "--context", "4096"])


def test_every_test_file_the_gpu_check_runs_exists():
    named = set(re.findall(r"tests/test_\w+\.py", SCRIPT.read_text()))
    assert named and all((ROOT / path).is_file() for path in named), named


def test_the_gpu_wheels_are_the_versions_this_suite_runs():
    """Each wheel at pyproject.toml's pin, or, for what it does not pin (tokenizers comes
    with transformers), at the version installed here."""
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    wheels = re.search(r"^GPU_WHEELS := (.*)$", makefile, re.M).group(1).split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [*project["dependencies"], *(p for extra in project["optional-dependencies"].values() for p in extra)]
    pinned = {_name(name): version for name, version in (p.split("==") for p in pins)}
    assert len(wheels) >= 8
    for wheel in wheels:
        name, version = wheel.split("==")
        assert pinned.get(_name(name), metadata.version(name)) == version, wheel


def _name(name: str) -> str:
    return name.lower().replace("_", "-")
