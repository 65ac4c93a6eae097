"""Client options: timeouts, retry policy, message limits, put batching."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cachesvc.wire.keys import DEFAULT_TENANT
from cachesvc.wire.tls import client_context, read_pem
from cachesvc_client.codec import EntryData

# Safe to repeat: reading, and writes whose repetition changes nothing.
IDEMPOTENT_METHODS = ("RegisterModel", "GetModel", "ListModels", "Lookup", "GetSlabs", "Delete",
                      "ListEntries", "Stats", "GetProfile", "ListProfiles")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """gRPC's own retry, applied by the channel to idempotent methods on UNAVAILABLE."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0

    def service_config(self) -> str:
        return json.dumps({"methodConfig": [{
            "name": [{"service": "cachesvc.v1.CacheService", "method": m} for m in IDEMPOTENT_METHODS],
            "retryPolicy": {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s}s",
                "maxBackoff": f"{self.max_backoff_s}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }}]})


@dataclass(frozen=True, slots=True)
class ClientOptions:
    tenant: str = DEFAULT_TENANT
    timeout_s: float = 10.0              # control calls
    data_timeout_s: float = 300.0        # WriteSlabs and GetSlabs streams
    max_message_bytes: int = 64 << 20    # must match the server's limit
    max_put_bytes: int = 256 << 20       # bytes per reservation (one atomic batch)
    # How bytes move: "auto" (shm on the node's host, else ucx with RDMA, else tcp, else
    # grpc), or one of "shm", "ucx", "tcp", "grpc" (an error if the node lacks it).
    transport: str = "auto"
    io_timeout_s: float = 30.0           # data plane: longest wait for any progress
    ucx_tls: str = ""                    # UCX transports (UCX_TLS); "" = UCX's own choice
    ucx_net_devices: str = ""            # UCX network devices (UCX_NET_DEVICES); "" = all
    # Threads that copy and verify slabs out of a same-host node's memory (shm); <= 1:
    # the receiving thread does. Off by default: on the H100 host measured (16 cores, a
    # VM), 4 threads moved no more than one (~4 GB/s) and slowed a pipelined prefill.
    copy_threads: int = 0
    retry: RetryPolicy | None = RetryPolicy()
    # TLS (a node started with --tls-cert): the CA that signed the node's certificate;
    # with a certificate and key of our own, mutual TLS. Covers gRPC and the TCP data
    # plane; the same-host shm path stays local and plain. ``tls_server_name`` overrides
    # the name checked against the node's certificate (default: the target's host).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    # API token of a node started with --auth-tokens (`cachesvc token` makes one): sent as
    # gRPC metadata on every call and as the first request of every data-plane connection.
    token: str = field(default="", repr=False)

    def credentials(self):
        """gRPC channel credentials, or None for a plaintext channel."""
        if not self.tls_ca:
            return None
        import grpc
        return grpc.ssl_channel_credentials(read_pem(self.tls_ca), read_pem(self.tls_key) if self.tls_key else None,
                                            read_pem(self.tls_cert) if self.tls_cert else None)

    def tls_context(self) -> ssl.SSLContext | None:
        """The TCP data plane's TLS context, or None."""
        return client_context(self.tls_ca, self.tls_cert, self.tls_key) if self.tls_ca else None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries: the token, when there is one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_options(self) -> list[tuple[str, object]]:
        opts: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 1 if self.retry else 0),
        ]
        if self.retry:
            opts.append(("grpc.service_config", self.retry.service_config()))
        if self.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return opts


def batches(entries: Sequence[EntryData], max_bytes: int) -> Iterator[list[EntryData]]:
    """Consecutive groups of entries of at most ``max_bytes`` each (one entry at least)."""
    batch: list[EntryData] = []
    size = 0
    for entry in entries:
        entry_bytes = sum(a.nbytes for a in entry.slabs.values())   # numpy and torch alike
        if batch and size + entry_bytes > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry_bytes
    if batch:
        yield batch

