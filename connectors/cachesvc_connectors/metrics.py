"""The consumer's side of reuse as Prometheus metrics, in the consumer's own process.

A node sees lookups and the bytes it serves, not what a consumer did with them (and a
same-host consumer copies located slabs without asking the node at all). Every
``Consumer`` records each prefill's ``ReuseReport`` here: how it was served, how many
prompt tokens were reused, where its time went (lookup, load, wait, recompute, suffix,
the whole prefill), the bytes it loaded by transport, and its drift guard's checks and
demotions. An ``Agent`` (cross-context reuse) records its prefills by strategy and its
prompt parts by what was done with them (reused, blended, estimated from anchors,
computed). Expose them with ``prometheus_client.start_http_server(port)`` in the
serving process; deploy/grafana/cachesvc.json charts them beside the node's.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PHASES = ("lookup", "load", "wait", "recompute", "suffix", "prefill")


class ReuseMetrics:
    """One set per registry (prometheus_client refuses a name twice in one)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.prefills = Counter("cachesvc_consumer_prefills", "prefills, by how they were served "
                                "(same_model, cross_model, prefill)", ["mode"], registry=registry)
        self.tokens = Counter("cachesvc_consumer_prompt_tokens", "prompt tokens, reused or computed",
                              ["source"], registry=registry)
        self.fallbacks = Counter("cachesvc_consumer_fallbacks", "prefills that reused less than the lookup found "
                                 "(missing or corrupt slabs, no plan)", registry=registry)
        self.bytes = Counter("cachesvc_consumer_loaded_bytes", "slab bytes loaded, by transport "
                             "(shm-direct: out of the node's memory tier without a request)", ["transport"],
                             registry=registry)
        self.seconds = Histogram("cachesvc_consumer_phase_seconds", "where a prefill's time went",
                                 ["phase"], buckets=_BUCKETS, registry=registry)
        self.agent_prefills = Counter("cachesvc_agent_prefills", "agents' prefills, by cross-context strategy",
                                      ["strategy"], registry=registry)
        self.agent_parts = Counter("cachesvc_agent_part_tokens", "agents' prompt tokens by what was done with "
                                   "their part (prefix: the agent's own stored prefix; reuse, blend, anchor: "
                                   "read from another context; compute)", ["action"], registry=registry)
        self.agent_seconds = Histogram("cachesvc_agent_prefill_seconds", "agents' prefill time, by strategy",
                                       ["strategy"], buckets=_BUCKETS, registry=registry)
        self._guards: weakref.WeakSet = weakref.WeakSet()
        registry.register(_GuardCollector(self._guards))

    def observe(self, report) -> None:
        """Record one prefill (a ``ReuseReport``)."""
        self.prefills.labels(report.mode).inc()
        self.tokens.labels("reused").inc(report.reused_tokens)
        self.tokens.labels("computed").inc(max(report.prompt_tokens - report.reused_tokens, 0))
        if report.fallback:
            self.fallbacks.inc()
        if report.bytes_fetched:
            self.bytes.labels(report.transport or "unknown").inc(report.bytes_fetched)
        for phase, value in (("lookup", report.lookup_s), ("load", report.fetch_s), ("wait", report.wait_s),
                             ("recompute", report.recompute_s), ("suffix", report.suffix_s),
                             ("prefill", report.prefill_s)):
            self.seconds.labels(phase).observe(value)

    def observe_agent(self, report) -> None:
        """Record one agent prefill (an ``AgentReport``): reused tokens under the part's
        action, the rest of its tokens as computed."""
        self.agent_prefills.labels(report.strategy).inc()
        self.agent_seconds.labels(report.strategy).observe(report.prefill_s)
        self.tokens.labels("reused").inc(report.reused_tokens)
        self.tokens.labels("computed").inc(max(report.prompt_tokens - report.reused_tokens, 0))
        if report.prefix_tokens:
            self.agent_parts.labels("prefix").inc(report.prefix_tokens)
        for part in report.parts:
            if part.reused_tokens:
                self.agent_parts.labels(part.action).inc(part.reused_tokens)
        self.agent_parts.labels("compute").inc(max(report.prompt_tokens - report.reused_tokens, 0))

    def track(self, guard) -> None:
        """Export a drift guard's checks and demotions (for as long as it lives)."""
        self._guards.add(guard)


class _GuardCollector:
    """Drift-guard totals over the live guards, read at scrape time."""

    def __init__(self, guards: weakref.WeakSet) -> None:
        self.guards = guards

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        checks = CounterMetricFamily("cachesvc_consumer_drift_checks", "answers a drift guard re-checked")
        identical = CounterMetricFamily("cachesvc_consumer_drift_identical",
                                        "re-checked answers identical to the consumer's own")
        demotions = CounterMetricFamily("cachesvc_consumer_drift_demotions", "plans a drift guard demoted")
        totals = [0, 0, 0]
        for guard in list(self.guards):
            seen = guard.metrics()
            totals[0] += seen["sampled"]
            totals[1] += round((seen["checked_identical_rate"] or 0) * seen["sampled"])
            totals[2] += seen["demotions"]
        for family, value in zip((checks, identical, demotions), totals, strict=True):
            family.add_metric([], value)
            yield family


_DEFAULT: ReuseMetrics | None = None
_LOCK = threading.Lock()


def default_metrics() -> ReuseMetrics:
    """The process's metrics in prometheus_client's default registry (made once)."""
    global _DEFAULT
    with _LOCK:
        if _DEFAULT is None:
            _DEFAULT = ReuseMetrics()
        return _DEFAULT
