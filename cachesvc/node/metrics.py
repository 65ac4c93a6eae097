"""Prometheus metrics of a node, served on ``--metrics-port`` (off by default).

Counts and levels are read from the store when Prometheus scrapes (``StoreCollector``):
the store already keeps them under its lock for ``Stats``, so the two can never
disagree and the request path pays nothing for metrics. Latencies are histograms
observed where requests are served: every gRPC method (``RPC_SECONDS``, by the
servicer's error-mapping wrapper) and every data-plane request (``DATAPLANE_SECONDS``).

What a node cannot see is its consumers' side: a same-host consumer copies located
slabs out of the memory tier without a request. Consumers export their own breakdown
(cachesvc_connectors.metrics); ``cachesvc_lookups_located_total`` counts the lookups
that handed such reads out. deploy/grafana/cachesvc.json charts both.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cachesvc.node.store import CacheStore

# Seconds; lookups take ~0.1-1 ms, fetches of a long context up to seconds.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
RPC_SECONDS = Histogram("cachesvc_rpc_seconds", "gRPC requests by method, to the answer's end (streams included)",
                        ["method"], buckets=_BUCKETS, registry=None)
DATAPLANE_SECONDS = Histogram("cachesvc_dataplane_request_seconds", "data-plane requests by op and path (tcp, shm)",
                              ["op", "path"], buckets=_BUCKETS, registry=None)

# store counter -> (metric name, help); the per-path and per-kind ones are labelled below
_COUNTERS = {
    "lookups": ("cachesvc_lookups", "lookups answered"),
    "located_lookups": ("cachesvc_lookups_located", "lookups that located their hits for same-host readers"),
    "lookup_chunks": ("cachesvc_lookup_chunks", "chunk hashes looked up"),
    "hit_chunks": ("cachesvc_hit_chunks", "chunks of the longest hit of each lookup"),
    "puts_committed": ("cachesvc_puts_committed", "puts committed"),
    "puts_aborted": ("cachesvc_puts_aborted", "puts aborted"),
    "entries_committed": ("cachesvc_entries_committed", "entries committed"),
    "entries_deleted": ("cachesvc_entries_deleted", "entries deleted"),
    "reservations_expired": ("cachesvc_reservations_expired", "puts aborted because their writer went quiet"),
    "leases_granted": ("cachesvc_leases_granted", "lookups that took a lease on their hit"),
    "leases_expired": ("cachesvc_leases_expired", "leases that ran out before an unpin"),
    "slabs_read": ("cachesvc_slabs_read", "slabs served"),
    "bytes_written": ("cachesvc_bytes_written", "payload bytes committed"),
    "checksum_failures": ("cachesvc_checksum_failures", "slabs that failed their checksum on disk (a miss)"),
    "disk_writes": ("cachesvc_disk_writes", "entry files written"),
    "disk_write_errors": ("cachesvc_disk_write_errors", "entry files that could not be written"),
    "profile_flags": ("cachesvc_profile_flags", "profiles flagged for re-profiling by consumers' drift guards"),
    "segment_puts": ("cachesvc_segment_puts", "segment sources registered (cross-context reuse)"),
    "segment_hits": ("cachesvc_segment_hits", "segment keys a find answered with a live source"),
    "segment_sources_dropped": ("cachesvc_segment_sources_dropped", "sources dropped because their entries went"),
    "anchors_admitted": ("cachesvc_anchors_admitted", "anchors admitted to a placeholder's pool"),
    "anchors_evicted": ("cachesvc_anchors_evicted", "anchors evicted (capacity, byte budget, or stale)"),
    "anchor_records": ("cachesvc_anchor_records", "agents' anchor offsets recorded"),
}
# store gauges -> (metric name, help)
_GAUGES = {
    "segment_sources": ("cachesvc_segment_sources", "segment sources indexed"),
    "anchors": ("cachesvc_anchors", "anchors over every placeholder's pool"),
    "anchor_pool_bytes": ("cachesvc_anchor_pool_bytes", "bytes of anchor offsets the pools hold"),
}
_PATHS = ("grpc", "tcp", "shm", "ucx", "lm", "replication")


class StoreCollector:
    """The store's counters and levels, read at each scrape."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store

    def describe(self) -> list[Metric]:
        # Nothing: the registry would otherwise collect once at registration (a walk of the
        # index for the tenant gauge) just to learn the names.
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        counters = stats["counters"]
        for key, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=counters[key])
        for key, (name, doc) in _GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=counters[key])
        hits = CounterMetricFamily("cachesvc_hit_chunks_by_kind", "chunks of the longest hit, by kind of reuse",
                                   labels=["kind"])
        hits.add_metric(["same_model"], counters["hit_chunks_same_model"])
        hits.add_metric(["cross_model"], counters["hit_chunks_cross_model"])
        yield hits
        served = CounterMetricFamily("cachesvc_bytes_read", "payload bytes served, by path", labels=["path"])
        for path in _PATHS:
            served.add_metric([path], counters[f"bytes_read_{path}"])
        yield served
        capacity = GaugeMetricFamily("cachesvc_tier_capacity_bytes", "tier budget", labels=["tier"])
        used = GaugeMetricFamily("cachesvc_tier_used_bytes", "bytes of committed entries", labels=["tier"])
        reserved = GaugeMetricFamily("cachesvc_tier_reserved_bytes", "bytes held by open puts", labels=["tier"])
        entries = GaugeMetricFamily("cachesvc_tier_entries", "entries held", labels=["tier"])
        evictions = CounterMetricFamily("cachesvc_evictions", "entries evicted", labels=["tier"])
        for tier in ("memory", "disk"):
            capacity.add_metric([tier], stats[tier]["capacity_bytes"])
            used.add_metric([tier], stats[tier]["used_bytes"])
            reserved.add_metric([tier], stats[tier]["reserved_bytes"])
            entries.add_metric([tier], stats[tier]["entries"])
            evictions.add_metric([tier], stats[tier]["evictions"])
        yield from (capacity, used, reserved, entries, evictions)
        by_tenant = GaugeMetricFamily("cachesvc_tenant_used_bytes", "bytes of committed entries, by tenant and tier",
                                      labels=["tenant", "tier"])
        for (tenant, tier), size in sorted(self.store.usage_by_tenant().items()):
            by_tenant.add_metric([tenant, tier], size)
        yield by_tenant
        yield GaugeMetricFamily("cachesvc_entries", "entries indexed", value=stats["entries"])
        yield GaugeMetricFamily("cachesvc_models", "models registered", value=stats["models"])
        yield GaugeMetricFamily("cachesvc_open_reservations", "puts in progress", value=stats["open_reservations"])
        yield GaugeMetricFamily("cachesvc_entries_being_read", "entries held by reads in progress",
                                value=counters["entries_being_read"])
        yield GaugeMetricFamily("cachesvc_uptime_seconds", "seconds since the node started", value=stats["uptime_s"])


def registry_for(store: CacheStore) -> CollectorRegistry:
    """A registry with this node's metrics (and no process-global default collectors but
    the latency histograms)."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    registry.register(RPC_SECONDS)
    registry.register(DATAPLANE_SECONDS)
    return registry


def serve_metrics(store: CacheStore, host: str, port: int):
    """Serve ``/metrics`` on host:port; (server, thread) to shut down."""
    return start_http_server(port, addr=host, registry=registry_for(store))
