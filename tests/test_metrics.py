"""Prometheus metrics: a real node's /metrics after real traffic, a consumer's own
metrics after real prefills, and the Grafana dashboard, whose every query must name a
metric one of them exports."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cachesvc_client import (AsyncCacheClient, CacheClient, ClientOptions, DType, InvalidArgumentError, Kind,
                             NotFoundError)
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
from cachesvc_connectors.hf.agents import AgentReport, PartReport
from cachesvc_connectors.metrics import default_metrics
from conftest import TINY, make_entry
from cachesvc_connectors.hf.loader import plan_requests
from cachesvc_connectors.reuse import Plan
from hf_models import fine_tune_of, tiny_model, tokenizer

DASHBOARD = Path(__file__).parents[1] / "deploy" / "grafana" / "cachesvc.json"


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the text exposition format."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def metered(server_factory):
    srv = server_factory("--memory-bytes", "64MiB", "--metrics-port", "0")   # any free port, logged
    return srv, f"http://127.0.0.1:{srv.serving('metrics_port')}/metrics"


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return _samples(answer.read().decode())


def test_the_node_counts_what_it_served(metered, rng):
    srv, url = metered
    with CacheClient(srv.address) as client:
        fid = client.register_model("m", "0123abcd", TINY, tenant="team-a").family_id
        hashes = client.hash_tokens(list(range(768)), fid)
        client.put(fid, "m", [make_entry(rng, TINY, h, 256) for h in hashes], tenant="team-a")
        before = _scrape(url)
        for _ in range(3):
            client.lookup(fid, hashes, consumer="m", tenant="team-a")
        hit = client.lookup(fid, hashes, tenant="team-a", locate=True).best()
        client.get(fid, hit, (Kind.K,), transport="tcp", tenant="team-a")
        client.get(fid, hit, (Kind.K,), transport="shm", tenant="team-a")
        client.get(fid, hit, (Kind.V,), transport="grpc", tenant="team-a")
        after = _scrape(url)
    grew = {name: after[key] - before.get(key, 0) for key in after for name in [key[0]]
            if key[1] == () and name.endswith("_total")}
    assert grew["cachesvc_lookups_total"] == 4 and grew["cachesvc_lookups_located_total"] == 1
    assert grew["cachesvc_lookup_chunks_total"] == 12 and grew["cachesvc_hit_chunks_total"] == 12
    same = ("cachesvc_hit_chunks_by_kind_total", (("kind", "same_model"),))
    assert after[same] - before.get(same, 0) == 9                      # the consumer "m" is the producer
    k_bytes = 3 * TINY.num_layers * TINY.slab_bytes(Kind.K, 256)
    for path in ("tcp", "shm", "grpc"):
        key = ("cachesvc_bytes_read_total", (("path", path),))
        assert after[key] - before.get(key, 0) == k_bytes, path
    assert after[("cachesvc_tenant_used_bytes", (("tenant", "team-a"), ("tier", "memory")))] == 3 * sum(
        TINY.slab_bytes(k, 256) for k in (Kind.K, Kind.V, Kind.E)) * TINY.num_layers
    fetched = ("cachesvc_rpc_seconds_count", (("method", "GetSlabs"),))
    assert after[fetched] - before.get(fetched, 0) == 1                 # the fetch over grpc
    assert after.get(("cachesvc_rpc_seconds_count", (("method", "Lookup"),)), 0) == 0   # lookups went by socket
    socket_lookups = ("cachesvc_dataplane_request_seconds_count", (("op", "lookup"), ("path", "shm")))
    assert after[socket_lookups] - before.get(socket_lookups, 0) == 4
    assert after[("cachesvc_tier_capacity_bytes", (("tier", "memory"),))] == 64 << 20


def test_a_same_host_client_ends_its_lease_over_the_socket(metered, rng):
    """A lease taken by a same-host lookup ends over the node's Unix socket (no gRPC call),
    and is gone: a second unpin is the same NotFound over the socket as over gRPC."""
    srv, url = metered
    with CacheClient(srv.address) as local, CacheClient(srv.address, ClientOptions(transport="grpc")) as remote:
        fid = local.register_model("m", "0123abcd", TINY).family_id
        hashes = local.hash_tokens(list(range(512)), fid)
        local.put(fid, "m", [make_entry(rng, TINY, h, 256) for h in hashes])
        before = _scrape(url)
        lease = local.lookup(fid, hashes, lease_ttl_s=30).lease_id
        assert lease
        local.unpin(lease)
        after = _scrape(url)
        raised = []
        for via in (local, remote):
            with pytest.raises(NotFoundError) as caught:
                via.unpin(lease)
            raised.append(str(caught.value))
        assert raised[0] == raised[1] and "does not exist" in raised[0]
    unpins = ("cachesvc_dataplane_request_seconds_count", (("op", "unpin"), ("path", "shm")))
    assert after[unpins] - before.get(unpins, 0) == 1
    assert after.get(("cachesvc_rpc_seconds_count", (("method", "Unpin"),)), 0) == 0
    granted = ("cachesvc_leases_granted_total", ())
    assert after[granted] - before.get(granted, 0) == 1


def test_a_same_host_put_is_no_grpc_call_and_fails_as_over_grpc(metered, rng):
    """A same-host client's put reserves and commits over the node's Unix socket around
    its WRITEs (no Reserve, WriteSlabs or Commit RPC), the entries readable after it; a
    bad put fails there with the same typed error as over gRPC, and nothing of it shows."""
    srv, url = metered
    with CacheClient(srv.address) as local, CacheClient(srv.address, ClientOptions(transport="grpc")) as remote:
        fid = local.register_model("m", "0123abcd", TINY).family_id
        hashes = local.hash_tokens(list(range(768)), fid)
        entries = [make_entry(rng, TINY, h, 256) for h in hashes]
        before = _scrape(url)
        assert local.put(fid, "m", entries).entries_committed == 3
        after = _scrape(url)
        assert remote.get(fid, remote.lookup(fid, hashes).best(), (Kind.K,)).valid_chunks == 3

        def grew(key) -> float:
            return after.get(key, 0) - before.get(key, 0)
        for op in ("reserve", "write", "commit"):
            assert grew(("cachesvc_dataplane_request_seconds_count", (("op", op), ("path", "shm")))) == \
                (3 if op == "write" else 1), op
        for method in ("Reserve", "WriteSlabs", "Commit"):
            assert grew(("cachesvc_rpc_seconds_count", (("method", method),))) == 0, method
        wrong = dataclasses.replace(entries[0], position_offset=7,   # a slab not of the family's shape
                                    slabs={k: np.ascontiguousarray(v[:, :1]) for k, v in entries[0].slabs.items()})
        raised = []
        for via in (local, remote):
            with pytest.raises(InvalidArgumentError) as caught:
                via.put(fid, "m", [wrong])
            raised.append(str(caught.value))
        assert raised[0] == raised[1]
        assert local.lookup(fid, hashes[:1]).best().entries[0].position_offset == 0   # nothing of it shows
        with pytest.raises(NotFoundError) as caught:
            local.put(fid, "nobody", entries[:1])
        assert "nobody" in str(caught.value)


def test_the_async_client_puts_looks_up_and_ends_its_lease_over_the_socket(metered, rng):
    """The asyncio client on the node's host does as the blocking one: its put, its lookup
    and its unpin go over the node's Unix socket (no Reserve, Commit, Lookup or Unpin
    RPC), with the same answers and errors as over gRPC."""
    srv, url = metered
    with CacheClient(srv.address) as blocking:
        fid = blocking.register_model("m", "0123abcd", TINY).family_id
        hashes = blocking.hash_tokens(list(range(512)), fid)
    entries = [make_entry(rng, TINY, h, 256) for h in hashes]

    async def lease_and_end() -> tuple[int, int, list[str]]:
        async with AsyncCacheClient(srv.address) as local, \
                AsyncCacheClient(srv.address, ClientOptions(transport="grpc")) as remote:
            assert (await local.put(fid, "m", entries)).entries_committed == 2
            result = await local.lookup(fid, hashes, lease_ttl_s=30, consumer="m")
            via_grpc = await remote.lookup(fid, hashes, consumer="m")
            assert result.lease_id
            await local.unpin(result.lease_id)
            raised = []
            for via in (local, remote):
                with pytest.raises(NotFoundError) as caught:
                    await via.unpin(result.lease_id)
                raised.append(str(caught.value))
            return result.best().num_chunks, via_grpc.best().num_chunks, raised
    before = _scrape(url)
    chunks, chunks_via_grpc, raised = asyncio.run(lease_and_end())
    after = _scrape(url)
    assert chunks == chunks_via_grpc == 2
    assert raised[0] == raised[1] and "does not exist" in raised[0]

    def grew(key) -> float:
        return after.get(key, 0) - before.get(key, 0)
    assert grew(("cachesvc_dataplane_request_seconds_count", (("op", "lookup"), ("path", "shm")))) == 1
    assert grew(("cachesvc_dataplane_request_seconds_count", (("op", "unpin"), ("path", "shm")))) == 2
    assert grew(("cachesvc_rpc_seconds_count", (("method", "Lookup"),))) == 1          # the grpc client's
    assert grew(("cachesvc_rpc_seconds_count", (("method", "Unpin"),))) == 1           # the grpc client's
    for op in ("reserve", "commit"):
        assert grew(("cachesvc_dataplane_request_seconds_count", (("op", op), ("path", "shm")))) == 1, op
    for method in ("Reserve", "Commit"):
        assert grew(("cachesvc_rpc_seconds_count", (("method", method),))) == 0, method
    assert grew(("cachesvc_leases_granted_total", ())) == 1


def _exported(url: str) -> set[str]:
    """Every sample name the node and a consumer process export, after traffic."""
    names = {name for name, _ in _scrape(url)}
    names |= {name for name, _ in _samples(generate_latest().decode())}
    return names


def test_every_dashboard_query_names_an_exported_metric(metered):
    srv, url = metered
    base, tok = tiny_model("llama", seed=0), tokenizer()
    ids = [random.Random(1).randrange(255) for _ in range(300)]
    with CacheClient(srv.address) as client:
        Producer(client, base, tok, "base", ProducerOptions(dtype=DType.FLOAT32)).store(ids)
        consumer = Consumer(client, base, tok, "base", ConsumerOptions(dtype=DType.FLOAT32))
        prefills = ("cachesvc_consumer_prefills_total", {"mode": "same_model"})
        before = REGISTRY.get_sample_value(*prefills) or 0
        assert consumer.prefill(ids + [3]).report.mode == "same_model"
        assert REGISTRY.get_sample_value(*prefills) == before + 1
        # an agent's prefill (tests/test_agents.py runs real ones) labels its strategy's series
        default_metrics().observe_agent(AgentReport("nearest", 100, 80, parts=[PartReport("doc", "reuse", 80, 80)]))
        exported = _exported(url)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(queries) >= 13
    named = {name for q in queries for name in re.findall(r"\bcachesvc_[a-z0-9_]+", q)}
    missing = sorted(named - exported)
    assert not missing, missing
    consumer_side = {n for n in named if n.startswith("cachesvc_consumer_")}
    assert consumer_side and named - consumer_side                      # both sides are charted


def test_consumer_metrics_record_the_breakdown():
    from cachesvc_connectors.hf.consumer import ReuseReport

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0
    before = {phase: value("cachesvc_consumer_phase_seconds_sum", phase=phase) for phase in ("lookup", "prefill")}
    bytes_before = value("cachesvc_consumer_loaded_bytes_total", transport="shm-direct")
    reused_before = value("cachesvc_consumer_prompt_tokens_total", source="reused")
    default_metrics().observe(ReuseReport(mode="cross_model", prompt_tokens=100, reused_tokens=80, lookup_s=0.5,
                                          prefill_s=2.0, bytes_fetched=10, transport="shm-direct"))
    assert value("cachesvc_consumer_phase_seconds_sum", phase="lookup") - before["lookup"] == pytest.approx(0.5)
    assert value("cachesvc_consumer_phase_seconds_sum", phase="prefill") - before["prefill"] == pytest.approx(2.0)
    assert value("cachesvc_consumer_loaded_bytes_total", transport="shm-direct") - bytes_before == 10
    assert value("cachesvc_consumer_prompt_tokens_total", source="reused") - reused_before == 80
    # an agent's prefill: by strategy, and its tokens by what was done with their part
    parts_before = {a: value("cachesvc_agent_part_tokens_total", action=a) for a in ("prefix", "anchor", "compute")}
    agent_before = value("cachesvc_agent_prefills_total", strategy="kvcomm")
    default_metrics().observe_agent(AgentReport("kvcomm", 500, 450, prefix_tokens=100, prefill_s=0.25,
                                                parts=[PartReport("doc", "anchor", 350, 350),
                                                       PartReport("P1", "compute", 50)]))
    assert value("cachesvc_agent_prefills_total", strategy="kvcomm") - agent_before == 1
    assert {a: value("cachesvc_agent_part_tokens_total", action=a) - parts_before[a] for a in parts_before} == \
        {"prefix": 100, "anchor": 350, "compute": 50}


def test_a_plan_fetched_over_the_data_plane_is_one_request(metered):
    """A consumer off the node's host (here: one told not to read directly) loads a plan
    of three load requests (E of the group, K/V below and above it) in one fetch; the
    node's own counters show it."""
    srv, url = metered
    base, tok = tiny_model("llama", seed=0), tokenizer()
    tuned = fine_tune_of(base, range(2, 4))
    plan = Plan(4, ((1, 2),))
    assert len(plan_requests(plan)) == 3
    ids = [random.Random(2).randrange(255) for _ in range(600)]
    with CacheClient(srv.address) as client:
        Producer(client, base, tok, "base", ProducerOptions(dtype=DType.FLOAT32)).store(ids)
        consumer = Consumer(client, tuned, tok, "tuned",
                            ConsumerOptions(dtype=DType.FLOAT32, default_plan=plan, direct=False))
        before = _scrape(url)
        report = consumer.prefill(ids + [4]).report
        after = _scrape(url)
    assert report.mode == "cross_model" and report.transport == "shm" and report.reused_tokens == 600
    fetches = ("cachesvc_dataplane_request_seconds_count", (("op", "get_shm"), ("path", "shm")))
    assert after[fetches] - before.get(fetches, 0) == 1
