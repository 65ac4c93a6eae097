"""Build and run the cachesvc gRPC server (cache service + health + reflection)."""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cachesvc.node.auth import TokenTable
from cachesvc.node.cluster import ClusterAgent, refuse_to_start
from cachesvc.node.config import ServerConfig, load_quotas
from cachesvc.wire import ucxlib
from cachesvc.wire.protocol import host_id
from cachesvc.wire.tls import read_pem, server_context
from cachesvc.node.dataplane.server import DataPlaneServer
from cachesvc.node.lmserver import LmEndpoint
from cachesvc.wire.framing import passthrough
from cachesvc.node.servicer import CacheServicer
from cachesvc.node.metrics import serve_metrics
from cachesvc.node.store import CacheStore, DiskMode, StoreConfig
from cachesvc.v1 import cachesvc_pb2

if TYPE_CHECKING:   # ucxx is optional: imported only when UCX is on
    from cachesvc.node.dataplane.ucx import UcxNode

log = logging.getLogger(__name__)
_M_MMAP_THRESHOLD = -3   # mallopt parameters from <malloc.h>
_M_ARENA_MAX = -8
SERVICE_NAME = cachesvc_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name
CLUSTER_HEALTH = "cachesvc.cluster"   # health service name: SERVING while this node reaches the cluster's Redis


def add_cache_service(server: grpc.Server, servicer: CacheServicer) -> None:
    """Register every CacheService method, like the generated ``add_..._to_server``,
    except that the two bulk methods exchange raw bytes framed by cachesvc.wire.framing
    (same wire format, payload copied once instead of three or four times)."""
    handlers = {}
    for method in cachesvc_pb2.DESCRIPTOR.services_by_name["CacheService"].methods:
        deserialize = message_factory.GetMessageClass(method.input_type).FromString
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        if method.name == "WriteSlabs":
            deserialize = passthrough
        if method.name == "GetSlabs":
            serialize = passthrough
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=deserialize, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options shared by the server and the SDK."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def store_config(config: ServerConfig) -> StoreConfig:
    mode = DiskMode(config.disk_mode)
    return StoreConfig(memory_capacity_bytes=config.memory_bytes,
                       memory_prefault=config.memory_prefault, chunk_size=config.chunk_size,
                       disk_dir=Path(config.data_dir).expanduser() if mode != DiskMode.OFF else None,
                       disk_capacity_bytes=config.disk_bytes, disk_mode=mode,
                       disk_fsync=config.disk_fsync, reservation_ttl_s=config.reservation_ttl_s,
                       max_run_bytes=min(4 << 20, config.max_message_bytes // 2),
                       quotas=load_quotas(config.tenant_quotas), segment_sources=config.segment_sources,
                       anchor_pool_bytes=config.anchor_pool_bytes)


@dataclass
class RunningServer:
    server: grpc.Server
    store: CacheStore
    dataplane: DataPlaneServer
    ucx: UcxNode | None
    health: health.HealthServicer
    port: int
    metrics: tuple | None = None     # (HTTP server, thread) of /metrics
    lm: LmEndpoint | None = None     # LMCache's lm:// protocol
    cluster: ClusterAgent | None = None

    def stop(self, grace_s: float) -> None:
        """Refuse new calls and transfers, let in-flight ones finish for up to ``grace_s``,
        then make the store durable and release it."""
        self.health.enter_graceful_shutdown()
        if self.cluster is not None:
            self.cluster.stop()      # leave lookups first: clients go to other replicas
        stopped = self.server.stop(grace_s)
        self.dataplane.stop(grace_s)
        if self.lm is not None:
            self.lm.stop()
        if self.ucx is not None:
            self.ucx.stop(grace_s)
        stopped.wait()
        if self.metrics is not None:
            self.metrics[0].shutdown()
        self.store.close()
        log.info("stopped")


def _tame_malloc() -> None:
    """Keep transient message buffers from inflating RSS (glibc only; best effort).

    glibc raises its mmap threshold after the first large free, after which megabyte
    message buffers come from per-thread heap arenas that keep freed memory: RSS
    then creeps above the memory budget under sustained writes. A fixed threshold
    returns every large buffer to the OS on free; two arenas bound the rest.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 << 10)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass


def start_ucx(config: ServerConfig, store: CacheStore) -> UcxNode | None:
    """The node's UCX worker, or None when UCX is off or (with "auto") not installed."""
    if config.ucx == "off" or (config.ucx == "auto" and (not ucxlib.available() or config.tls_cert or
                                                         config.auth_tokens)):
        return None   # UCX has no TLS and no token handshake: such a node does not offer it
    if config.tls_cert:
        raise RuntimeError("--ucx on cannot be combined with TLS: UCX moves bytes in the clear")
    if not ucxlib.available():
        raise RuntimeError("--ucx on needs ucxx: pip install 'cachesvc[ucx]'")
    from cachesvc.node.dataplane.ucx import UcxNode
    devices = config.ucx_net_devices
    if not devices and ipaddress.ip_address(socket.gethostbyname(config.host)).is_loopback:
        devices = "lo"   # nothing of a test or laptop node is reachable from outside
    return UcxNode(store, config.data_io_timeout_s, config.ucx_tls, devices)


def start_server(config: ServerConfig) -> RunningServer:
    _tame_malloc()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers,
                                                    thread_name_prefix="rpc"),
                         options=grpc_options(config.max_message_bytes))
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(read_pem(config.tls_key), read_pem(config.tls_cert))],
            root_certificates=read_pem(config.tls_client_ca) if config.tls_client_ca else None,
            require_client_auth=bool(config.tls_client_ca))
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    node_id = config.node_id or f"{socket.gethostname()}:{port}"
    advertised = config.advertise_host or config.host
    if config.redis_url:   # refuse to start as another live node, or out of step, before opening anything
        refuse_to_start(config.redis_url, config.cluster_namespace, node_id, f"{advertised}:{port}",
                        config.chunk_size)
    tokens = TokenTable(config.auth_tokens) if config.auth_tokens else None
    shm = config.shm
    if tokens is not None and shm and not config.trust_host:
        # The memory tier holds every tenant's bytes: with tokens, a same-host client
        # must not be handed all of it unless the host's users are trusted.
        log.info("shared-memory path off: --auth-tokens without --trust-host true")
        shm = False
    store = CacheStore(store_config(config), node_id=node_id)
    tls = server_context(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
    dataplane = DataPlaneServer(store, config.host, config.data_port, shm,
                                config.shm_release_timeout_s, config.data_io_timeout_s, tls, tokens)
    dataplane.tcp_address = f"{advertised}:{dataplane.tcp_address.rsplit(':', 1)[1]}"
    ucx = start_ucx(config, store)
    transports = dataplane.transports() | (ucx.transports() if ucx is not None else {})
    fetch = cachesvc_pb2.FetchDescriptor(node_id=node_id, grpc_address=f"{advertised}:{port}",
                                         transports=transports, host_id=host_id())
    dataplane.fetch = fetch
    health_servicer = health.HealthServicer()
    cluster = None
    if config.redis_url:
        def cluster_health(up: bool) -> None:
            health_servicer.set(CLUSTER_HEALTH, health_pb2.HealthCheckResponse.SERVING if up
                                else health_pb2.HealthCheckResponse.NOT_SERVING)
        cluster = ClusterAgent(store, fetch, config.redis_url, config.cluster_namespace, config.heartbeat_ttl_s,
                               cluster_health, config.replication, config.rebalance_bytes_per_s, config.peer_token)
    dataplane.cluster = cluster
    add_cache_service(server, CacheServicer(store, fetch, cluster, tokens))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    lm = None
    if config.lm_port >= 0:
        disk_dir = store.config.disk_dir   # None when the disk tier is off: keys then live in memory only
        lm = LmEndpoint(store, config.host, config.lm_port, config.lm_tenant, config.max_message_bytes,
                        config.data_io_timeout_s, Path(disk_dir) / "lmcache-keys.txt" if disk_dir else None)
    store.start()
    dataplane.start()
    if lm is not None:
        lm.start()
    if ucx is not None:
        ucx.start()
    server.start()
    if cluster is not None:
        cluster.start()       # announced only once it serves
    metrics = serve_metrics(store, config.host, config.metrics_port) if config.metrics_port >= 0 else None
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"address": f"{config.host}:{port}", "node_id": node_id,
                               "memory_bytes": config.memory_bytes, "disk_mode": config.disk_mode,
                               "data_dir": config.data_dir, "chunk_size": config.chunk_size,
                               "transports": sorted(fetch.transports), "tls": bool(config.tls_cert),
                               "mtls": bool(config.tls_client_ca), "auth": tokens is not None,
                               "metrics_port": metrics[0].server_port if metrics is not None else None,
                               "lm_port": lm.port if lm is not None else None,
                               "cluster": cluster.keys.ns if cluster is not None else None})
    if config.port_file:
        tmp = Path(config.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(config.port_file)
    return RunningServer(server, store, dataplane, ucx, health_servicer, port, metrics, lm, cluster)


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain and exit 0."""
    running = start_server(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal received; draining", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Wake up now and then: a signal delivered to another thread (gRPC's and UCX's C
    # threads do not block them) sets Python's flag but does not interrupt an untimed
    # wait here, so the handler could wait for the next bytecode of the main thread.
    while not stop.wait(0.5):
        pass
    running.stop(config.grace_s)
    return 0
