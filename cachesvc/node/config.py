"""Server configuration: one typed dataclass, three ways to set each field.

Precedence, lowest first: built-in defaults < config file (TOML, ``--config`` or
``CACHESVC_CONFIG``) < environment ``CACHESVC_<FIELD>`` < command-line ``--<field>``.
Field ``memory_bytes`` is ``memory_bytes`` in the file, ``CACHESVC_MEMORY_BYTES`` in the
environment and ``--memory-bytes`` on the command line. Sizes accept units
(``512MiB``, ``2GB``, ``1073741824``). Defaults work on a laptop: 127.0.0.1, memory sized
from available RAM, disk tier under the user's data directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ENV_PREFIX = "CACHESVC_"
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9,
          "GB": 10**9, "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"512MiB"`` → 536870912; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 1073741824, 512MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def default_memory_bytes() -> int:
    """A quarter of the RAM available now, at least 64 MiB."""
    return max(64 << 20, psutil.virtual_memory().available // 4)


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "cachesvc")


def _opt(default: Any = None, *, factory: Callable[[], Any] | None = None, parse: Callable = str,
         help: str, choices: Sequence[str] | None = None) -> Any:
    meta = {"parse": parse, "help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(slots=True)
class ServerConfig:
    host: str = _opt("127.0.0.1", help="address to listen on")
    port: int = _opt(7070, parse=int, help="gRPC port; 0 picks a free one")
    port_file: str = _opt("", help="write the bound port to this file once serving")
    data_port: int = _opt(0, parse=int, help="TCP port of the socket data plane; 0 picks a free one")
    shm: bool = _opt(True, parse=parse_bool,
                     help="offer same-host clients the memory tier as shared memory (any local "
                          "user who can reach the node can then read every cached slab)")
    ucx: str = _opt("auto", choices=("auto", "on", "off"),
                    help="UCX data plane (needs the ucx extra): auto = when ucxx imports")
    ucx_tls: str = _opt("", help="UCX transports (UCX_TLS), e.g. rc,sm,self on an InfiniBand "
                                 "host; empty = UCX's own choice")
    ucx_net_devices: str = _opt("", help="UCX network devices (UCX_NET_DEVICES); empty = lo "
                                         "when host is a loopback address, else all")
    tls_cert: str = _opt("", help="PEM certificate (chain): serve gRPC and the TCP data plane over TLS")
    tls_key: str = _opt("", help="PEM private key of --tls-cert")
    tls_client_ca: str = _opt("", help="PEM CA: require client certificates it signed (mTLS)")
    allow_plaintext: bool = _opt(False, parse=parse_bool,
                                 help="serve without TLS on an address other than loopback (trusted networks only)")
    metrics_port: int = _opt(-1, parse=int, help="Prometheus /metrics on this port of --host; -1: off, 0: any "
                                                  "free one (logged)")
    lm_port: int = _opt(-1, parse=int, help="serve LMCache's lm:// protocol on this port of --host (plaintext, "
                                            "no auth, as LMCache speaks it); -1: off, 0: any free one (logged)")
    lm_tenant: str = _opt("", help="tenant whose namespace lm:// chunks are stored in (empty: the default)")
    auth_tokens: str = _opt("", help="JSON file of API tokens (their SHA-256, tenant and role; `cachesvc token` "
                                     "makes them): every caller must present one; empty: no authentication")
    trust_host: bool = _opt(False, parse=parse_bool,
                            help="with --auth-tokens: still offer same-host clients the memory tier as shared "
                                 "memory (it holds every tenant's bytes: only for a host whose local users "
                                 "are all trusted)")
    tenant_quotas: str = _opt("", help="JSON file of per-tenant quotas, {\"TENANT\": {\"memory_bytes\": \"1GiB\", "
                                       "\"disk_bytes\": \"4GiB\"}}: a tenant over its quota evicts its own entries")
    peer_token: str = _opt("", help="API token this node presents to the other nodes of its cluster when it "
                                    "copies entries to them (admin role; set it through the environment, "
                                    "CACHESVC_PEER_TOKEN, not the command line)")
    node_id: str = _opt("", help="name of this node; default host:port")
    advertise_host: str = _opt("", help="host name or address other hosts reach this node by (gRPC and the TCP "
                                        "data plane); default --host")
    redis_url: str = _opt("", help="join a cluster whose shared index and membership live in this Redis "
                                   "(redis://host:port/db; ?cluster=true for Redis Cluster); empty: a lone node")
    cluster_namespace: str = _opt("cachesvc", help="prefix of the cluster's Redis keys (several clusters "
                                                   "may share one Redis)")
    replication: int = _opt(2, parse=int, help="copies of each entry the cluster keeps: a node re-replicates what "
                                               "it leads when members come and go (0: never; clients place puts "
                                               "with their own factor)")
    rebalance_bytes_per_s: int = _opt(64 << 20, parse=parse_size,
                                      help="bandwidth this node spends copying entries to other nodes")
    heartbeat_ttl_s: float = _opt(3.0, parse=float,
                                  help="a node that has not heart-beaten for this long drops out of lookups "
                                       "(it heart-beats every third of it)")
    memory_bytes: int = _opt(factory=default_memory_bytes, parse=parse_size,
                             help="memory tier budget (default: 1/4 of available RAM)")
    data_io_timeout_s: float = _opt(30.0, parse=float,
                                    help="data plane: longest wait for a peer inside a request")
    shm_release_timeout_s: float = _opt(60.0, parse=float,
                                        help="how long a same-host client may hold entries "
                                             "it is copying out of shared memory")
    memory_prefault: bool = _opt(False, parse=parse_bool,
                                 help="allocate the whole memory tier at start (~1 s per GiB): "
                                      "puts into never-used memory are several times slower; "
                                      "recommended for production")
    disk_mode: str = _opt("write_through", choices=("write_through", "spill", "off"),
                          help="write_through: every commit goes to disk too; spill: on "
                               "eviction and shutdown; off: memory only")
    data_dir: str = _opt(factory=default_data_dir, help="disk tier directory")
    disk_bytes: int = _opt(10 << 30, parse=parse_size, help="disk tier budget")
    disk_fsync: bool = _opt(False, parse=parse_bool, help="fsync every entry file")
    chunk_size: int = _opt(256, parse=int, help="tokens per chunk (clients hash with it)")
    segment_sources: int = _opt(65536, parse=int, help="cross-context reuse: segment sources the node indexes "
                                                       "(references to stored spans; least recently used out)")
    anchor_pool_bytes: int = _opt(256 << 20, parse=parse_size,
                                  help="cross-context reuse: bytes of anchor offsets (KVCOMM's anchor pool) "
                                       "kept over every placeholder's pool")
    reservation_ttl_s: float = _opt(30.0, parse=float,
                                    help="idle seconds before an open put is aborted")
    max_message_bytes: int = _opt(64 << 20, parse=parse_size,
                                  help="largest gRPC message accepted or sent")
    workers: int = _opt(16, parse=int, help="gRPC worker threads")
    grace_s: float = _opt(10.0, parse=float, help="seconds SIGTERM waits for in-flight RPCs")
    log_level: str = _opt("info", choices=("debug", "info", "warning", "error"), help="log level")
    log_format: str = _opt("json", choices=("json", "text"), help="log line format")

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        if not self.tls_cert and not self.allow_plaintext and not _loopback(self.host):
            raise ValueError(f"refusing to serve plaintext on {self.host}: give --tls-cert and --tls-key, or "
                             f"--allow-plaintext true on a trusted network (plaintext is the default on "
                             f"127.0.0.1 only)")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError(f"metrics port {self.metrics_port} out of range (-1 turns metrics off)")
        if not -1 <= self.lm_port < 65536:
            raise ValueError(f"lm port {self.lm_port} out of range (-1 turns the lm:// endpoint off)")
        if self.lm_port >= 0 and not _loopback(self.host) and not self.allow_plaintext:
            raise ValueError(f"lm:// has neither TLS nor auth: serving it on {self.host} needs --allow-plaintext true "
                             "(a trusted network)")
        if self.auth_tokens and self.lm_port >= 0 and not self.lm_tenant:
            raise ValueError("lm:// carries no token: with --auth-tokens it needs --lm-tenant, the one tenant its "
                             "(trusted, unauthenticated) callers write to")
        if self.auth_tokens and self.ucx == "on":
            raise ValueError("UCX has no authentication handshake: --ucx on cannot be combined with --auth-tokens")
        if self.chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        if self.memory_bytes < 1 << 20:
            raise ValueError(f"memory_bytes {self.memory_bytes} is below 1 MiB")
        if any(ord(c) < 32 for c in self.node_id):
            raise ValueError("node_id must not contain control characters")
        if self.replication < 0 or self.rebalance_bytes_per_s <= 0:
            raise ValueError("replication must be >= 0 and rebalance_bytes_per_s > 0")
        if self.redis_url and self.replication and self.tls_cert:
            raise ValueError("re-replication copies between nodes in plaintext: use --replication 0 with TLS")
        if self.heartbeat_ttl_s < 0.3:
            raise ValueError(f"heartbeat_ttl_s {self.heartbeat_ttl_s} is below 0.3 s")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url {self.redis_url!r} must start with redis://, rediss:// or unix://")
        if self.workers < 2:
            raise ValueError("workers must be >= 2")


def _loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (a loopback address or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(ServerConfig))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per field; unset flags stay None so lower layers show through."""
    parser.add_argument("--config", help=f"TOML config file (or {ENV_PREFIX}CONFIG)")
    for f in _fields():
        env = ENV_PREFIX + f.name.upper()
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            choices=f.metadata["choices"],
                            help=f"{f.metadata['help']} [env {env}]")


def load_config(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                config_file: str | None = None) -> ServerConfig:
    """Merge defaults, file, environment and flags; raise ValueError naming a bad key."""
    env = os.environ if env is None else env
    flags = flags or {}
    values: dict[str, Any] = {}
    path = config_file or flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if path:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
        known = {f.name for f in _fields()}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
        values.update(doc)
    for f in _fields():
        if ENV_PREFIX + f.name.upper() in env:
            values[f.name] = env[ENV_PREFIX + f.name.upper()]
        if flags.get(f.name) is not None:
            values[f.name] = flags[f.name]
    parsed = {}
    for f in _fields():
        if f.name in values:
            try:
                parsed[f.name] = f.metadata["parse"](values[f.name])
            except ValueError as exc:
                raise ValueError(f"{f.name}: {exc}") from None
            if f.metadata["choices"] and parsed[f.name] not in f.metadata["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}")
    config = ServerConfig(**parsed)
    config.validate()
    return config


def load_quotas(path: str) -> dict:
    """Tenant -> Quota from a JSON file (sizes with units); ValueError naming the problem."""
    from cachesvc.node.records import Quota
    if not path:
        return {}
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"tenant quotas file {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"tenant quotas file {path}: expected an object of tenant -> quota")
    quotas = {}
    for tenant, spec in doc.items():
        unknown = set(spec) - {"memory_bytes", "disk_bytes"} if isinstance(spec, dict) else {"(not an object)"}
        if unknown:
            raise ValueError(f"tenant quotas file {path}: tenant {tenant!r}: unknown keys {sorted(unknown)}")
        try:
            quotas[tenant] = Quota(parse_size(spec.get("memory_bytes", 0)), parse_size(spec.get("disk_bytes", 0)))
        except ValueError as exc:
            raise ValueError(f"tenant quotas file {path}: tenant {tenant!r}: {exc}") from None
    return quotas
