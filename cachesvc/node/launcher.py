"""Start ``cachesvc serve`` as a child process on a free port of 127.0.0.1 and wait until
it serves. Used by the demo, the benchmarks and the tests (one launcher, not three)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerProcess:
    """``args`` are extra ``cachesvc serve`` flags. The port file and the log
    (``server.log``) live in ``workdir``; the disk tier in ``data_dir`` (default
    ``workdir/data``). Usable as a context manager (start, then SIGTERM)."""

    workdir: Path
    args: Sequence[str] = ()
    data_dir: Path | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)
    port: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if self.data_dir is None:
            self.data_dir = self.workdir / "data"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> "ServerProcess":
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "cachesvc.node.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file), "--data-dir", str(self.data_dir), *self.args]
        with open(self.workdir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {timeout_s} s")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        """Send ``sig`` and wait; killed if it has not exited by ``timeout_s``."""
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

    def serving(self, field: str):
        """A field of the latest "serving" log line (JSON logs at info level): how a
        test learns the ports a node picked itself (``--metrics-port 0``, ``--lm-port 0``)."""
        for line in reversed(self.log().splitlines()):
            if line.startswith("{") and json.loads(line).get("msg") == "serving":
                return json.loads(line)[field]
        raise RuntimeError(f"no serving line in the node's log: {self.log()[-500:]}")

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RedisProcess:
    """A ``redis-server`` of our own on a free port of 127.0.0.1 that keeps nothing on disk
    (no RDB, no AOF: a restart starts it empty, as the cluster must survive). For tests,
    benchmarks and ``make demo-cluster``; never the machine's shared one."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10, *extra: str) -> "RedisProcess":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt install redis-server)")
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir), "--protected-mode", "yes", *extra]
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: "
                                   f"{(self.workdir / 'redis.log').read_text()[-1000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on {self.port} within {timeout_s} s")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> "RedisProcess":
        """Stop and start again on the same port: empty (it keeps nothing)."""
        self.stop()
        return self.start()

    def __enter__(self) -> "RedisProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RedisClusterProcess:
    """A Redis Cluster of ``shards`` masters (no replicas) on free ports of 127.0.0.1,
    keeping nothing on disk; ``url`` is what nodes and clients take."""

    workdir: Path
    shards: int = 3
    servers: list[RedisProcess] = field(default_factory=list, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.servers[0].port}/0?cluster=true"

    def start(self, timeout_s: float = 20) -> "RedisClusterProcess":
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()            # no shard outlives a cluster that failed to form
            raise

    def _start(self, timeout_s: float) -> "RedisClusterProcess":
        for i in range(self.shards):
            # Redis Cluster talks between shards on port + 10000: both must be free.
            server = RedisProcess(Path(self.workdir) / f"shard{i}", free_port(below=55536, offset=10000))
            self.servers.append(server.start(10, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                             "--cluster-node-timeout", "2000"))
        create = subprocess.run([shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                                 *(f"127.0.0.1:{s.port}" for s in self.servers), "--cluster-replicas", "0",
                                 "--cluster-yes"], capture_output=True, text=True, timeout=timeout_s)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-500:]} {create.stderr[-500:]}")
        deadline = time.monotonic() + timeout_s
        while True:      # every shard must agree the cluster is up before it serves
            states = [subprocess.run([shutil.which("redis-cli") or "redis-cli", "-p", str(s.port), "cluster", "info"],
                                     capture_output=True, text=True).stdout for s in self.servers]
            if all("cluster_state:ok" in state for state in states):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError("Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> "RedisClusterProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(below: int = 65536, offset: int = 0) -> int:
    """A TCP port of 127.0.0.1 under ``below`` nobody listens on now (nor on the port
    ``offset`` above it, when given: a Redis Cluster shard's bus port)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0 if below == 65536 else random.randrange(20000, below)))
            port = sock.getsockname()[1]
            if port < below and (not offset or _free(port + offset)):
                return port
    raise RuntimeError(f"no free port under {below}")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class LocalCluster:
    """A redis-server and ``size`` nodes (``n0``, ``n1``, …) joined through it, on free
    ports of 127.0.0.1: the cluster tests and ``cachesvc bench cluster`` run on it."""

    workdir: Path
    size: int = 3
    node_args: Sequence[str] = ()
    redis: RedisProcess | None = field(default=None, init=False)
    nodes: dict[str, ServerProcess] = field(default_factory=dict, init=False)

    def start(self) -> "LocalCluster":
        self.workdir = Path(self.workdir)
        self.redis = RedisProcess(self.workdir / "redis").start()
        for i in range(self.size):
            self.start_node(f"n{i}")
        return self

    def start_node(self, node_id: str, *extra: str) -> ServerProcess:
        """Start (or restart, with its data directory) node ``node_id``."""
        assert self.redis is not None
        workdir = self.workdir / node_id
        workdir.mkdir(parents=True, exist_ok=True)
        node = ServerProcess(workdir, ["--redis-url", self.redis.url, "--node-id", node_id, *self.node_args,
                                       *extra]).start()
        self.nodes[node_id] = node
        return node

    def live(self) -> list[ServerProcess]:
        return [n for n in self.nodes.values() if n.proc is not None and n.proc.poll() is None]

    def close(self) -> None:
        for node in self.live():
            node.proc.send_signal(signal.SIGCONT)     # a paused node must be able to die
            node.stop(signal.SIGKILL)
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
