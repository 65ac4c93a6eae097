"""The cluster with real processes: a redis-server of our own, three cachesvc nodes, the
ClusterClient. Membership, the global index, placement and replication, and the chaos
cases of issue 15 (kill -9 under load, Redis restarted empty, a paused node, a node that
returns with stale entries). Every byte a client accepts is compared with what was put."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachesvc.node.launcher import LocalCluster
from cachesvc.wire.cluster import IndexRecord, Keys
from cachesvc_client import CacheClient, FailedPreconditionError, Kind, UnavailableError
from cachesvc_client.cluster import ClusterClient
from conftest import TINY, make_entry

TTL = "1"          # heartbeat TTL (s): dead nodes drop out fast
KINDS = (Kind.K, Kind.V, Kind.E)


class Cluster(LocalCluster):
    def client(self, **kwargs) -> ClusterClient:
        client = ClusterClient(redis_url=self.redis.url, **kwargs)
        client.wait_ready(len(self.live()))
        return client


@pytest.fixture
def cluster(tmp_path: Path):
    with Cluster(tmp_path, 3, ["--memory-bytes", "64MiB", "--heartbeat-ttl-s", TTL, "--replication", "2",
                               "--reservation-ttl-s", "3"]) as made:
        yield made


def prompt(client: ClusterClient, family_id: str, rng: np.random.Generator, chunks: int, seed: int = 0):
    tokens = [seed * 100_000 + i for i in range(256 * chunks)]
    hashes = client.hash_tokens(tokens, family_id)
    return hashes, [make_entry(rng, TINY, h, 256, position_offset=256 * i) for i, h in enumerate(hashes)]


def exact(slabs, entries, kinds=KINDS) -> int:
    """Leading entries whose every slab arrived byte-identical (0 wrong bytes is asserted
    by callers comparing this with ``valid_chunks``)."""
    good = 0
    for i, entry in enumerate(entries[:slabs.valid_chunks]):
        t0 = slabs.token_offsets[i]
        for kind in kinds:
            for layer in range(TINY.num_layers):
                if slabs.arrays[kind][layer, t0:t0 + 256].tobytes() != entry.slabs[(kind, layer)].tobytes():
                    return good
        good += 1
    return good


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def test_puts_are_replicated_and_looked_up_cluster_wide(cluster, rng):
    with cluster.client() as client:
        reg = client.register_model("m1", "abcdef01", TINY)
        hashes, entries = prompt(client, reg.family_id, rng, 12)
        result = client.put(reg.family_id, "m1", entries)
        assert (result.replicas_written, result.under_replicated, result.lost) == (24, 0, 0)
        # each entry on exactly its two placement nodes, and nowhere else
        per_node = {}
        for node_id, node in cluster.nodes.items():
            with CacheClient(node.address) as one:
                per_node[node_id] = {e.chunk_hash for e in one.list_entries(limit=1000)[0]}
        for h in hashes:
            assert {n for n, held in per_node.items() if bytes(h) in held} == set(client.placement(h))
        # the global index answers the whole prompt, with both owners of every chunk
        hit = wait_for(lambda: client.lookup(reg.family_id, hashes).best("m1"), 3, "published")
        assert hit.num_chunks == 12
        assert [set(o) for o in hit.owners] == [set(client.placement(h)) for h in hashes]
        slabs = client.get(reg.family_id, hit, KINDS)
        assert slabs.valid_chunks == 12 and exact(slabs, entries) == 12
        # through a seed node instead of Redis: the same answer
        with ClusterClient(seeds=[cluster.nodes["n2"].address]) as seeded:
            assert seeded.lookup(reg.family_id, hashes).best("m1").owners == hit.owners
            assert exact(seeded.get(reg.family_id, hit, KINDS), entries) == 12
        # another tenant given these hashes finds nothing (the index is per tenant, as a node's is)
        assert client.lookup(reg.family_id, hashes, tenant="beta").hits == []
        # a prefix of another prompt stops the run where they part
        other, _ = prompt(client, reg.family_id, rng, 4, seed=7)
        assert client.lookup(reg.family_id, other).hits == []
        assert client.lookup(reg.family_id, [*hashes[:5], *other]).best("m1").num_chunks == 5


def test_only_committed_entries_are_published_and_deletes_unpublish(cluster, rng):
    with cluster.client() as client, CacheClient(cluster.nodes["n0"].address) as n0:
        reg = client.register_model("m1", "abcdef01", TINY)
        hashes, entries = prompt(client, reg.family_id, rng, 2)
        keys, r = Keys(), redis.Redis.from_url(cluster.redis.url)
        stub = n0._stub
        # a reservation that is never committed: nothing of it in the index, ever
        from cachesvc_client.codec import plan_put
        plan = plan_put("default", reg.family_id, TINY, "m1", entries[:1])
        reservation = stub.Reserve(plan.request)
        time.sleep(0.6)
        assert r.hgetall(keys.chunk("default", reg.family_id, hashes[0])) == {}
        stub.Abort(n0_abort(reservation.reservation_id))
        # committed: published; deleted: unpublished
        n0.put(reg.family_id, "m1", entries)
        fields = wait_for(lambda: r.hgetall(keys.chunk("default", reg.family_id, hashes[0])), 3, "published")
        assert [IndexRecord.parse(f, v).node_id for f, v in fields.items()] == ["n0"]
        assert n0.delete(reg.family_id, chunk_hashes=hashes) == 2
        wait_for(lambda: not r.hgetall(keys.chunk("default", reg.family_id, hashes[0])), 3, "unpublished")
        assert client.lookup(reg.family_id, hashes).hits == []


def n0_abort(reservation_id: str):
    from cachesvc.v1 import cachesvc_pb2 as pb
    return pb.AbortRequest(reservation_id=reservation_id)


def test_bad_cluster_requests_get_precise_errors(cluster, server, rng):
    with cluster.client() as client, CacheClient(cluster.nodes["n1"].address) as n1, \
            CacheClient(server.address) as lone:
        reg = client.register_model("m1", "abcdef01", TINY)
        hashes, _ = prompt(client, reg.family_id, rng, 2)
        with pytest.raises(FailedPreconditionError, match="lease_ttl_s"):
            n1._call(n1._stub.Lookup, lookup_request(reg.family_id, hashes, lease_ttl_s=5))
        with pytest.raises(FailedPreconditionError, match="not in a cluster"):
            lone.cluster_lookup(reg.family_id, hashes)
        with pytest.raises(FailedPreconditionError, match="not in a cluster"):
            lone.cluster_nodes()
        # another model id with the same name but other weights: refused cluster-wide,
        # even by a node that never saw the first registration
        with pytest.raises(FailedPreconditionError, match="registered in the cluster"):
            n1.register_model("m1", "ffffffff", TINY)
        with pytest.raises(ValueError, match="seed nodes or the cluster's Redis URL"):
            ClusterClient()


def lookup_request(family_id, hashes, **fields):
    from cachesvc.v1 import cachesvc_pb2 as pb
    return pb.LookupRequest(family_id=family_id, chunk_hashes=hashes, cluster=True, **fields)


def test_kill9_under_mixed_load_loses_no_byte_and_falls_over(cluster, rng):
    """Writers and readers run while a node is killed -9. Every read is compared with
    what was written; reads fall over to the other replica, and hits are retained."""
    with cluster.client() as client:
        reg = client.register_model("m1", "abcdef01", TINY)
        prompts = [prompt(client, reg.family_id, rng, 4, seed=s) for s in range(24)]
        for _hashes, entries in prompts[:12]:
            client.put(reg.family_id, "m1", entries)
        stop, lock = threading.Event(), threading.Lock()
        tally = {"reads": 0, "hits": 0, "chunks": 0, "valid": 0, "wrong": 0, "errors": 0, "writes": 0,
                 "slowest_s": 0.0}

        def reader(seed: int):
            local = np.random.default_rng(seed)
            with ClusterClient(redis_url=cluster.redis.url) as mine:
                while not stop.is_set():
                    hashes, entries = prompts[int(local.integers(0, 12))]
                    t0 = time.monotonic()
                    try:
                        hit = mine.lookup(reg.family_id, hashes).best("m1")
                        slabs = mine.get(reg.family_id, hit, KINDS) if hit else None
                    except UnavailableError:
                        with lock:
                            tally["errors"] += 1
                        continue
                    took = time.monotonic() - t0
                    good = exact(slabs, entries) if slabs else 0
                    with lock:
                        tally["reads"] += 1
                        tally["hits"] += hit is not None and hit.num_chunks == 4
                        tally["chunks"] += 4
                        tally["valid"] += slabs.valid_chunks if slabs else 0
                        tally["wrong"] += (slabs.valid_chunks - good) if slabs else 0
                        tally["slowest_s"] = max(tally["slowest_s"], took)

        def writer():
            with ClusterClient(redis_url=cluster.redis.url) as mine:
                for _hashes, entries in prompts[12:]:
                    if stop.is_set():
                        return
                    mine.put(reg.family_id, "m1", entries)
                    with lock:
                        tally["writes"] += 1

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        cluster.nodes["n1"].stop(signal.SIGKILL)
        time.sleep(2.5)
        stop.set()
        for t in threads:
            t.join()
        assert tally["wrong"] == 0, tally
        assert tally["reads"] > 20 and tally["errors"] == 0, tally
        assert tally["hits"] >= 0.99 * tally["reads"], tally
        assert tally["valid"] >= 0.99 * tally["chunks"], tally
        assert tally["slowest_s"] < 2.0, tally
        # every prompt written before and during the kill is still whole somewhere
        for hashes, entries in prompts[:12 + tally["writes"]]:
            hit = client.lookup(reg.family_id, hashes).best("m1")
            assert hit is not None and hit.num_chunks == 4
            assert exact(client.get(reg.family_id, hit, KINDS), entries) == 4


def test_paused_node_drops_out_within_ttl_and_returns(cluster, rng):
    with cluster.client() as client:
        reg = client.register_model("m1", "abcdef01", TINY)
        hashes, entries = prompt(client, reg.family_id, rng, 8)
        client.put(reg.family_id, "m1", entries)
        paused = cluster.nodes["n2"]
        paused.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            wait_for(lambda: "n2" not in client.nodes(fresh=True), 3, "paused node out of the membership")
            assert time.monotonic() - t0 <= float(TTL) + 0.5
            hit = client.lookup(reg.family_id, hashes).best("m1")
            assert hit.num_chunks == 8 and all("n2" not in owners for owners in hit.owners)
            assert exact(client.get(reg.family_id, hit, KINDS), entries) == 8
        finally:
            paused.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: "n2" in client.nodes(fresh=True), 5, "resumed node back")
        hit = wait_for(lambda: client.lookup(reg.family_id, hashes).best("m1"), 3, "hits")
        assert exact(client.get(reg.family_id, hit, KINDS), entries) == 8


def test_redis_restarted_empty_rebuilds_the_index(cluster, rng):
    with cluster.client() as client:
        reg = client.register_model("m1", "abcdef01", TINY)
        hashes, entries = prompt(client, reg.family_id, rng, 10)
        client.put(reg.family_id, "m1", entries)
        wait_for(lambda: client.lookup(reg.family_id, hashes).best("m1"), 3, "published")
        # a reader keeps going through the restart: it may miss, it may not accept a wrong byte
        stop, seen = threading.Event(), {"wrong": 0, "whole": 0, "failed": 0}

        def reader():
            with cluster.client() as mine:
                while not stop.is_set():
                    try:
                        hit = mine.lookup(reg.family_id, hashes).best("m1")
                        slabs = mine.get(reg.family_id, hit, KINDS) if hit else None
                    except UnavailableError:
                        seen["failed"] += 1
                        time.sleep(0.05)
                        continue
                    if slabs is not None:
                        good = exact(slabs, entries)
                        seen["wrong"] += slabs.valid_chunks - good
                        seen["whole"] += good == 10
        load = threading.Thread(target=reader)
        load.start()
        time.sleep(0.3)
        cluster.redis.stop()
        # Redis down: nodes keep serving their own entries, and say so
        n0 = cluster.nodes["n0"]
        with CacheClient(n0.address) as one:
            channel = grpc.insecure_channel(n0.address)
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service="cachesvc.cluster")).status ==
                     health_pb2.HealthCheckResponse.NOT_SERVING, 5, "cluster health NOT_SERVING")
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert one.stats()["counters"]["cluster_redis_up"] == 0
            held = one.list_entries(limit=100)[0]
            assert held                   # placement gave n0 some of the 10 chunks
            for stored in held:           # ... and it still answers for each of them
                i = [bytes(h) for h in hashes].index(stored.chunk_hash)
                local = one.lookup(reg.family_id, [hashes[i]]).best("m1")
                assert exact(one.get(reg.family_id, local, KINDS), entries[i:i + 1]) == 1
            with pytest.raises(UnavailableError, match="lost the cluster's Redis"):
                one.cluster_lookup(reg.family_id, hashes)
            channel.close()
        t0 = time.monotonic()
        cluster.redis.start()            # same port, empty
        hit = wait_for(lambda: (lambda h: h if h and h.num_chunks == 10 and
                                min(map(len, h.owners)) == 2 else None)(
            client.lookup(reg.family_id, hashes).best("m1")), 30, "index rebuilt")
        rebuilt_s = time.monotonic() - t0
        assert rebuilt_s < 30
        assert exact(client.get(reg.family_id, hit, KINDS), entries) == 10
        whole_before = seen["whole"]
        time.sleep(0.5)
        stop.set()
        load.join()
        assert seen["wrong"] == 0 and seen["failed"] > 0, seen      # it did read through the outage
        assert seen["whole"] > whole_before, seen                     # and whole again after it


def test_node_returning_with_stale_entries_never_serves_them(cluster, rng):
    """n2 is away while the model is replaced with other weights; it comes back with the
    old entries on its disk. They must never hit as the new model's."""
    with cluster.client() as client:
        reg = client.register_model("m1", "abcdef01", TINY)
        hashes, entries = prompt(client, reg.family_id, rng, 6)
        client.put(reg.family_id, "m1", entries)
        assert cluster.nodes["n2"].stop(signal.SIGTERM) == 0     # its entries are on its disk
        wait_for(lambda: "n2" not in client.nodes(fresh=True), 3, "n2 gone")
        client.register_model("m1", "12345678", TINY, replace=True)
        assert client.lookup(reg.family_id, hashes).hits == []   # the old weights' entries are gone
        cluster.start_node("n2")
        wait_for(lambda: "n2" in client.nodes(fresh=True), 5, "n2 back")
        time.sleep(1.0)
        assert client.lookup(reg.family_id, hashes).hits == []
        with CacheClient(cluster.nodes["n2"].address) as n2:
            assert n2.list_models()[0]["weights_digest"] == "12345678"   # adopted the cluster's
            assert n2.list_entries(limit=100)[0] == []                   # and dropped the old entries
        _, fresh = prompt(client, reg.family_id, np.random.default_rng(9), 6)
        client.put(reg.family_id, "m1", fresh)
        hit = client.lookup(reg.family_id, hashes).best("m1")
        assert hit.num_chunks == 6 and exact(client.get(reg.family_id, hit, KINDS), fresh) == 6


def test_lost_replicas_are_recreated_and_a_joining_node_gets_its_share(cluster, rng):
    with cluster.client() as client:
        reg = client.register_model("m1", "abcdef01", TINY)
        hashes, entries = prompt(client, reg.family_id, rng, 16)
        client.put(reg.family_id, "m1", entries)
        cluster.nodes["n0"].stop(signal.SIGKILL)

        def replicated():
            hit = client.lookup(reg.family_id, hashes).best("m1")
            return hit if hit and "n0" not in client.nodes(fresh=True) and \
                all(len(o) == 2 and "n0" not in o for o in hit.owners) else None
        hit = wait_for(replicated, 15, "every chunk on two live nodes again")
        assert exact(client.get(reg.family_id, hit, KINDS), entries) == 16
        # n0 stays away: after ten TTLs the others forget it, and the fields it wrote
        r, keys = redis.Redis.from_url(cluster.redis.url), Keys()
        assert r.scard(keys.held("n0")) >= 16 * 2 // 3
        wait_for(lambda: r.scard(keys.held("n0")) == 0 and r.hget(keys.nodes, "n0") is None, 20, "n0 forgotten")
        assert not any(IndexRecord.parse(f, v).node_id == "n0"
                       for h in hashes for f, v in r.hgetall(keys.chunk("default", reg.family_id, h)).items())
        client.register_model("m2", "abcdef02", TINY)
        client.put_profile("m1", "m2", "abcdef01", "abcdef02", {"plans": ["[2,4)"]})
        client.register_model("m1", "beef0001", TINY, tenant="beta")       # beta's own m1: other weights
        cluster.start_node("n3")
        wait_for(lambda: "n3" in client.nodes(fresh=True), 5, "n3 joined")
        with CacheClient(cluster.nodes["n3"].address) as n3:    # models and profiles are cluster-wide, per tenant
            assert {m["model_id"] for m in n3.list_models()} == {"m1", "m2"}
            assert n3.get_profile("m1", "m2").document == {"plans": ["[2,4)"]}
            assert [m["weights_digest"] for m in n3.list_models(tenant="beta")] == ["beef0001"]
            assert n3.list_profiles(tenant="beta") == []

        def rebalanced():
            hit = client.lookup(reg.family_id, hashes).best("m1")
            return hit if all(set(client.placement(h)) <= set(o) for h, o in zip(hashes, hit.owners, strict=True)) \
                else None
        hit = wait_for(rebalanced, 15, "every chunk on its new placement")
        moved = [i for i, owners in enumerate(hit.owners) if "n3" in owners]
        assert moved                      # rendezvous gave the newcomer a share (16 chunks, 3 nodes)
        with CacheClient(cluster.nodes["n3"].address) as n3:
            for i in moved:               # copied whole and verified: byte-identical
                assert exact(n3.get(reg.family_id, hit[i:i + 1], KINDS), entries[i:i + 1]) == 1


def test_a_context_ending_mid_chunk_is_offered_and_verified_across_the_cluster(cluster, rng):
    """A producer stored 2.5 chunks (the half chunk put with its parent); a longer prompt
    over the same context reuses all of it, as on one node (docs/chunk-keys.md)."""
    import dataclasses
    with cluster.client() as client:
        reg = client.register_model("m1", "abcdef01", TINY)
        context = list(range(640))
        hashes = client.hash_tokens(context, reg.family_id, include_partial=True)
        assert len(hashes) == 3
        entries = [make_entry(rng, TINY, h, 256 if i < 2 else 128, position_offset=256 * i)
                   for i, h in enumerate(hashes)]
        entries[2] = dataclasses.replace(entries[2], parent_hash=bytes(hashes[1]))
        client.put(reg.family_id, "m1", entries)
        question = context + [90_000 + i for i in range(200)]
        hit = client.lookup_prompt(reg.family_id, question).best("m1")
        assert hit.num_chunks == 3 and hit.num_tokens == 640
        assert set(hit.owners[2]) == set(client.placement(hashes[2]))
        assert exact(client.get(reg.family_id, hit, KINDS), entries[:2]) == 2
        got = client.get(reg.family_id, hit, KINDS)
        assert got.valid_chunks == 3
        assert all(got.arrays[k][layer, 512:640].tobytes() == entries[2].slabs[(k, layer)].tobytes()
                   for k in KINDS for layer in range(4))
        # through a node, the same offer; another prompt's tokens do not verify it
        with ClusterClient(seeds=[cluster.nodes["n0"].address]) as seeded:
            assert seeded.lookup_prompt(reg.family_id, question).best("m1").num_tokens == 640
            other = context[:512] + [7] * 300
            assert seeded.lookup_prompt(reg.family_id, other).best("m1").num_tokens == 512


def test_hf_connector_runs_unchanged_against_the_cluster(cluster):
    """The HF Producer and Consumer take a ClusterClient: the plan's answer is exact, the
    whole context (its partial chunk too) is reused, and a node killed after the lookup
    costs nothing but a fall-over."""
    import random

    import torch

    from cachesvc_client import DType
    from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
    from cachesvc_connectors.reuse.plan import Plan
    from hf_models import fine_tune_of, last_logits, tiny_model, tokenizer

    base, tok = tiny_model("llama", seed=0), tokenizer()
    tuned = fine_tune_of(base, range(2, 4))
    rng = random.Random(3)
    ids = [rng.randrange(255) for _ in range(700)]
    with cluster.client() as client:
        stored = Producer(client, base, tok, "base", ProducerOptions(dtype=DType.FLOAT32)).store(ids)
        assert stored.chunks == 3
        consumer = Consumer(client, tuned, tok, "tuned",
                            ConsumerOptions(dtype=DType.FLOAT32, default_plan=Plan(4, ((2, 4),))))
        for kill in (False, True):
            if kill:    # the plan's next fetch meets a dead owner for some chunks
                cluster.nodes["n1"].stop(signal.SIGKILL)
            with torch.no_grad():
                pre = consumer.prefill(ids + [9])
                out = consumer.model(input_ids=consumer.stack.ids([9]), past_key_values=pre.cache)
            assert pre.report.mode == "cross_model" and pre.report.reused_tokens == 700
            assert torch.allclose(out.logits[0, -1], last_logits(tuned, ids + [9]), atol=1e-4, rtol=0)


def test_a_redis_cluster_holds_the_index_across_its_shards(tmp_path, rng):
    """Redis Cluster (3 shards, through redis-py's cluster client): the same cluster
    behaviour, with the index spread over the shards and lookups pipelined per shard."""
    from cachesvc.node.launcher import RedisClusterProcess, ServerProcess
    with RedisClusterProcess(tmp_path / "redis") as shards:
        nodes = []
        for i in range(3):
            (tmp_path / f"n{i}").mkdir()
            nodes.append(ServerProcess(tmp_path / f"n{i}", ["--redis-url", shards.url, "--node-id", f"n{i}",
                                                            "--memory-bytes", "64MiB", "--heartbeat-ttl-s", TTL]).start())
        try:
            with ClusterClient(redis_url=shards.url) as client:
                client.wait_ready(3)
                reg = client.register_model("m1", "abcdef01", TINY)
                hashes, entries = prompt(client, reg.family_id, rng, 40)
                assert client.put(reg.family_id, "m1", entries).replicas_written == 80
                hit = client.lookup(reg.family_id, hashes).best("m1")
                assert hit.num_chunks == 40 and exact(client.get(reg.family_id, hit, KINDS), entries) == 40
                held = [redis.Redis(port=s.port).dbsize() for s in shards.servers]
                assert sum(1 for n in held if n > 0) == 3          # every shard holds part of it
                nodes[1].stop(signal.SIGKILL)
                assert exact(client.get(reg.family_id, hit, KINDS), entries) == 40
                wait_for(lambda: "n1" not in client.nodes(fresh=True), 3, "n1 out")
                hit = client.lookup(reg.family_id, hashes).best("m1")
                assert hit.num_chunks == 40 and all("n1" not in o for o in hit.owners)
        finally:
            for node in nodes:
                if node.proc.poll() is None:
                    node.stop(signal.SIGKILL)


def test_segment_sources_and_anchors_over_chains_spread_across_nodes(cluster, rng):
    """A node accepts a segment source whose chain it does not hold whole (the global
    index says the cluster does), hands it out while the chain is held somewhere, drops
    it once the chain is deleted everywhere; a chain held nowhere is refused."""
    from cachesvc.wire.segments import AnchorDelta, SegmentSource
    from cachesvc_client import InvalidArgumentError

    with cluster.client() as client:
        reg = client.register_model("m1", "abcdef01", TINY)
        fid = reg.family_id
        hashes, entries = prompt(client, fid, rng, 6)
        assert client.put(fid, "m1", entries).lost == 0
        chain = tuple(bytes(h) for h in hashes)
        held = {}
        for node_id, node in cluster.nodes.items():
            with CacheClient(node.address) as one:
                held[node_id] = {bytes(e.chunk_hash) for e in one.list_entries(limit=1000)[0]}
        lacking = next(n for n, mine in held.items() if not set(chain) <= mine)
        source = SegmentSource("m1", chain, 300, 700)
        key = client.segment_key(list(range(700)), fid)
        with CacheClient(cluster.nodes[lacking].address) as node:
            assert node.put_segment(fid, key, source) == 1
            assert node.find_segments(fid, [key]) == [[source]]
            with pytest.raises(InvalidArgumentError, match="holds 1536"):
                node.put_segment(fid, key, SegmentSource("m1", chain, 1000, 600))
            nowhere, _ = prompt(client, fid, rng, 2, seed=9)
            with pytest.raises(FailedPreconditionError, match="not every chunk"):
                node.put_segment(fid, key, SegmentSource("m1", tuple(bytes(h) for h in nowhere), 0, 10))
            # an anchor's delta over chains of other nodes: its bytes are counted from the index
            admitted, _ = node.admit_anchor(fid, "q", key, source)
            assert admitted
            node.record_anchor(fid, "q", key, AnchorDelta("a1", "m1", chain[:2], chain[2:3], 256))
            [anchor] = node.find_anchors(fid, "q")
            assert anchor.deltas["a1"].size_bytes == 3 * sum(a.nbytes for a in entries[0].slabs.values())
            # through the cluster client: the segment's homes, found from any client
            client.put_segment(fid, key, source)
            assert client.find_segments(fid, [key, b"\0" * 32]) == [[source], []]
            client.delete(fid, chunk_hashes=[chain[4]], producer="m1")
            wait_for(lambda: node.find_segments(fid, [key]) == [[]], 3, "stale source dropped")
            assert client.find_segments(fid, [key]) == [[]]
            assert node.find_anchors(fid, "q") == []       # its base went with the chain


def test_segments_and_anchor_pools_follow_their_keys_to_a_joining_node(cluster, rng):
    """A node that joins becomes the first home of some segment keys and anchor pools; it
    starts without them, and the first read through a ClusterClient finds them at the
    next home (the old first home) and puts them at the new one."""
    from cachesvc.wire.cluster import rendezvous
    from cachesvc.wire.segments import AnchorDelta, SegmentSource

    after = ["n0", "n1", "n2", "n3"]
    with cluster.client() as client:
        fid = client.register_model("m1", "abcdef01", TINY).family_id
        hashes, entries = prompt(client, fid, rng, 6)
        assert client.put(fid, "m1", entries).lost == 0
        chain = tuple(bytes(h) for h in hashes)
        source = SegmentSource("m1", chain, 300, 700)
        key = next(k for k in (client.segment_key(list(range(i, i + 700)), fid) for i in range(200))
                   if rendezvous(k, after, 1) == ["n3"])
        placeholder = next(p for p in (f"q{i}" for i in range(200))
                           if rendezvous(client._anchor_home_key(fid, p, ""), after, 1) == ["n3"])
        client.put_segment(fid, key, source)
        assert client.admit_anchor(fid, placeholder, key, source)[0]
        delta = AnchorDelta("a1", "m1", chain[:2], chain[2:3], 256)
        client.record_anchor(fid, placeholder, key, delta)

        cluster.start_node("n3")
        wait_for(lambda: "n3" in client.nodes(fresh=True), 5, "n3 joined")
        with CacheClient(cluster.nodes["n3"].address) as n3:
            assert n3.find_segments(fid, [key]) == [[]]         # the new home starts empty
            assert n3.find_anchors(fid, placeholder) == []
            assert client.find_segments(fid, [key, b"\0" * 32]) == [[source], []]
            assert n3.find_segments(fid, [key]) == [[source]]   # repaired at the new home
            [found] = client.find_anchors(fid, placeholder)
            assert (found.segment_key, found.base, list(found.deltas)) == (key, source, ["a1"])
            [moved] = n3.find_anchors(fid, placeholder)
            assert (moved.segment_key, moved.base) == (key, source)
            assert moved.deltas["a1"].chains() == delta.chains()


def test_agents_share_segments_and_anchors_through_the_cluster(cluster):
    """The HF agents run unchanged against a ClusterClient: a segment another agent
    published is re-rotated behind this agent's prefix, and KVCOMM's anchor pool records
    and estimates through the pool's home node."""
    import random

    import torch

    from cachesvc_client import DType
    from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
    from cachesvc_connectors.hf.agents import Agent, AgentTemplate
    from cachesvc_connectors.reuse.segments import AnchorOptions
    from hf_models import tiny_model, tokenizer

    model, tok = tiny_model("llama", seed=0), tokenizer()
    rng = random.Random(5)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(255)}" for _ in range(n))

    def agent(client, name: str, **kw) -> Agent:
        options = dict(dtype=DType.FLOAT32)
        return Agent(name, Consumer(client, model, tok, "m", ConsumerOptions(**options)),
                     Producer(client, model, tok, "m", ProducerOptions(**options)), **kw)

    with cluster.client() as client:
        writer, reader = agent(client, "writer"), agent(client, "reader", anchors=AnchorOptions(gamma=1.0, min_anchors=2))
        content = words(600)
        writer.publish(AgentTemplate.from_text("writer", f"{words(37)} {{question}} {words(10)}").fill(
            tok, {"question": content}))
        template = AgentTemplate.from_text("reader", f"{words(94)} {{question}} {words(12)}")
        prompt = template.fill(tok, {"question": content})
        pre = reader.prefill(prompt, "nearest")
        [question] = [p for p in pre.report.parts if p.name == "question"]
        assert question.action == "reuse" and question.shift == 94 - 37 and question.source == "m@37"
        own = reader.stack.new_cache()
        with torch.no_grad():
            model.model(input_ids=reader.stack.ids(prompt.ids[:-1]), past_key_values=own, use_cache=True)
        assert torch.allclose(pre.cache.layers[0].keys[:, :, 94:694], own.layers[0].keys[:, :, 94:694], atol=1e-5)
        reports = []
        for _ in range(4):
            content = words(250)
            writer.publish(AgentTemplate.from_text("writer", f"{words(25)} {{question}} {words(5)}").fill(
                tok, {"question": content}))
            pre = reader.prefill(template.fill(tok, {"question": content}), "kvcomm")
            pre.finish()
            reports.append(pre.report)
        assert [r.reused_tokens for r in reports[:2]] == [0, 0]
        assert len(client.find_anchors(reader.family_id, "question")) >= 2
        assert reports[-1].reused_tokens > 0 and reports[-1].fallback == ""


def test_a_node_id_held_by_a_live_member_or_another_chunk_size_is_refused(cluster):
    """Two processes under one node id would overwrite each other's membership and index
    fields, and a node of another chunk size would hash chunks no one else matches: both
    are refused at start with the reason, and the cluster keeps serving."""
    from cachesvc.node.launcher import ServerProcess

    for node_id, extra, reason in (("n1", (), "node id 'n1' is held by a live member at 127.0.0.1:"),
                                   ("n7", ("--chunk-size", "128"), "the cluster's chunk size is 256 tokens, "
                                                                   "this node's is 128")):
        workdir = cluster.workdir / f"refused-{node_id}"
        workdir.mkdir()
        with pytest.raises(RuntimeError, match="server exited 2") as refused:
            ServerProcess(workdir, ["--redis-url", cluster.redis.url, "--node-id", node_id, *extra]).start()
        assert reason in str(refused.value)
        assert "Traceback" not in str(refused.value)
        assert not (workdir / "data").exists()        # refused before opening anything
    with cluster.client() as client:
        assert set(client.nodes(fresh=True)) == {"n0", "n1", "n2"}
    # A node restarting under its own id at its own address is its previous life: it rejoins.
    cluster.nodes["n2"].stop(signal.SIGKILL)
    port = cluster.nodes["n2"].port
    cluster.start_node("n2", "--port", str(port))
    with cluster.client() as client:
        wait_for(lambda: set(client.nodes(fresh=True)) == {"n0", "n1", "n2"}, 5, "n2 back")
