"""Run docker-compose.yml's topology as local processes: ``make demo-cluster``, and what
tests/test_compose.py runs, so the compose file cannot drift from what is tested.

Each service runs its ``command`` with its ``environment``, as written, after the only
changes one host needs: service host names and ``0.0.0.0`` become 127.0.0.1, each
published port becomes a free one (consistently, wherever it appears), a container path
such as ``/data`` becomes a folder of the run, and the programs ``cachesvc``, ``python``
and ``redis-server`` are this environment's. Services start in ``depends_on`` order; a
service with published ports counts as up once they accept connections.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cachesvc.node.launcher import free_port

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
LOCAL = "127.0.0.1"


@dataclass
class Service:
    name: str
    command: list[str]
    environment: dict[str, str]
    ports: list[int]                 # container ports published, as written
    depends_on: list[str]
    volumes: list[str]               # container paths of its volumes
    proc: subprocess.Popen | None = field(default=None, repr=False)


def load(path: Path = COMPOSE_FILE) -> dict[str, Service]:
    """The services of a compose file (anchors and merge keys resolved by YAML)."""
    doc = yaml.safe_load(path.read_text())
    services = {}
    for name, spec in doc["services"].items():
        env = spec.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        services[name] = Service(
            name, [str(a) for a in spec["command"]], {k: str(v) for k, v in env.items()},
            [int(str(p).split(":")[-1]) for p in spec.get("ports", [])], list(spec.get("depends_on") or []),
            [str(v).split(":", 1)[1] for v in spec.get("volumes", [])])
    return services


class Topology:
    """The services of a compose file as processes under ``workdir``."""

    def __init__(self, services: dict[str, Service], workdir: Path, only: set[str] | None = None) -> None:
        self.services = {n: s for n, s in services.items() if only is None or n in only}
        self.workdir = Path(workdir)
        self.ports = {p: free_port() for s in self.services.values() for p in s.ports}
        self._names = set(services)

    # ------------------------------------------------------------ translation

    def translate(self, service: Service, text: str, host: bool = False) -> str:
        """One argument or environment value, for this host; ``host``: it names a host
        (the value of a ``--...host`` flag or a ``..._HOST`` variable)."""
        if text == "0.0.0.0" or (host and text in self._names):
            return LOCAL
        if text.isdigit() and int(text) in self.ports:
            return str(self.ports[int(text)])
        for path in service.volumes:
            if text == path or text.startswith(path + "/"):
                return str(self.workdir / service.name / text.lstrip("/"))

        def url(m: re.Match) -> str:
            host, port = m.group(2), m.group(3)
            if host in self._names:
                host = LOCAL
            if port and int(port) in self.ports:
                port = str(self.ports[int(port)])
            return f"{m.group(1)}{host}{':' + port if port else ''}"
        return re.sub(r"([a-z+]+://)([A-Za-z0-9_.-]+)(?::(\d+))?", url, text)

    def argv(self, service: Service) -> list[str]:
        program, *args = service.command
        head = {"cachesvc": [sys.executable, "-m", "cachesvc.node.cli"], "python": [sys.executable],
                "redis-server": [shutil.which("redis-server") or "redis-server"]}.get(program, [program])
        out = head + [self.translate(service, a, i > 0 and args[i - 1].endswith("host"))
                      for i, a in enumerate(args)]
        if program == "redis-server":
            out += ["--bind", LOCAL, "--dir", str(self.workdir / service.name)]   # never all interfaces
        return out

    def env(self, service: Service) -> dict[str, str]:
        return {**os.environ, **{k: self.translate(service, v, k.endswith("HOST"))
                                 for k, v in service.environment.items()}}

    # ------------------------------------------------------------ running

    def order(self) -> Iterator[Service]:
        done: set[str] = set()
        while len(done) < len(self.services):
            ready = [s for n, s in self.services.items()
                     if n not in done and all(d in done or d not in self.services for d in s.depends_on)]
            if not ready:
                raise ValueError("depends_on has a cycle")
            for service in ready:
                done.add(service.name)
                yield service

    def start(self, service: Service, timeout_s: float = 60) -> subprocess.Popen:
        (self.workdir / service.name).mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / service.name / "log", "ab")
        service.proc = subprocess.Popen(self.argv(service), env=self.env(service), stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        for port in (self.ports[p] for p in service.ports):
            while True:
                if service.proc.poll() is not None:
                    raise RuntimeError(f"{service.name} exited {service.proc.returncode}: {self.log(service.name)}")
                try:
                    socket.create_connection((LOCAL, port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{service.name} not listening on {port} within {timeout_s} s") from None
                    time.sleep(0.05)
        return service.proc

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.workdir / name / "log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def up(self, wait_for: str | None = None, timeout_s: float = 1800) -> int | None:
        """Start every service in order; with ``wait_for``, wait for that one to exit and
        return its exit code."""
        for service in self.order():
            self.start(service)
        if wait_for is None:
            return None
        return self.services[wait_for].proc.wait(timeout_s)

    def down(self) -> None:
        for service in reversed(list(self.order())):
            if service.proc is not None and service.proc.poll() is None:
                service.proc.send_signal(signal.SIGTERM)
                try:
                    service.proc.wait(20)
                except subprocess.TimeoutExpired:
                    service.proc.kill()

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run docker-compose.yml's services as local processes")
    parser.add_argument("--file", type=Path, default=COMPOSE_FILE)
    parser.add_argument("--service", default="demo", help="the service to wait for (default: demo)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="cachesvc-cluster-"))
    with Topology(load(args.file), workdir) as topology:
        print(f"running {', '.join(topology.services)} as processes under {workdir}; ports: "
              + ", ".join(f"{a}->{b}" for a, b in topology.ports.items()), flush=True)
        for service in topology.order():
            if service.name != args.service:
                topology.start(service)
        demo = topology.services[args.service]
        demo.proc = subprocess.Popen(topology.argv(demo), env=topology.env(demo))
        code = demo.proc.wait()
    print(f"{args.service} exited with code {code}; logs under {workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
