"""The anchor pool on a real node: per-placeholder capacity and KVCOMM's eviction, a byte
budget that holds under 10x oversubscription (evicted deltas' entries deleted), stale
anchors dropped, and anchors back after a restart."""

from __future__ import annotations

import pytest

from cachesvc.wire.segments import AnchorDelta, SegmentSource
from cachesvc_client import CacheClient, FailedPreconditionError, Kind, NotFoundError, ResourceExhaustedError
from conftest import TINY, make_entry


def _chain(client, rng, family_id, producer, tokens, salt: str) -> tuple[bytes, ...]:
    hashes = client.hash_tokens(tokens, family_id, extra_keys=(salt,), include_partial=True)
    sizes = [min(256, len(tokens) - 256 * i) for i in range(len(hashes))]
    client.put(family_id, producer, [make_entry(rng, TINY, h, n, kinds=(Kind.K,
                                                                        Kind.V))
                                     for h, n in zip(hashes, sizes, strict=True)])
    return tuple(hashes)


def _anchor(client, rng, family_id, i: int, length: int = 64) -> tuple[bytes, SegmentSource]:
    content = [i * 1000 + t for t in range(length)]
    base = SegmentSource("agent-a", _chain(client, rng, family_id, "agent-a", content, "base"), 0, length)
    return client.segment_key(content, family_id), base


def _delta(client, rng, family_id, i: int, agent: str, length: int = 64) -> AnchorDelta:
    ph = _chain(client, rng, family_id, "agent-a", [i * 1000 + t for t in range(length)], f"ph-{agent}")
    pf = _chain(client, rng, family_id, "agent-a", [i * 1000 + t for t in range(16)], f"pf-{agent}")
    return AnchorDelta(agent, "agent-a", ph, pf, 16)


def test_capacity_eviction_activation_and_stale_anchors(client, rng):
    family_id = client.register_model("agent-a", "aaaa0001", TINY).family_id
    keys = []
    for i in range(20):
        key, base = _anchor(client, rng, family_id, i)
        assert client.admit_anchor(family_id, "question", key, base) == (True, [])
        keys.append(key)
    assert client.admit_anchor(family_id, "question", keys[0], base)[0] is False     # already one
    client.activate_anchors(family_id, "question", [keys[0], keys[1], keys[3], keys[4]])
    # The 21st evicts the least activated of the 5 oldest: the third.
    key, base = _anchor(client, rng, family_id, 20)
    assert client.admit_anchor(family_id, "question", key, base) == (True, [keys[2]])
    pool = client.find_anchors(family_id, "question")
    assert len(pool) == 20 and keys[2] not in {a.segment_key for a in pool}
    assert {a.segment_key: a.activations for a in pool}[keys[0]] == 1
    assert client.find_anchors(family_id, "question", min_length=65) == []
    assert client.find_anchors(family_id, "answer") == []                # pools are per placeholder
    # A stale anchor (its base deleted) is dropped, never handed out.
    client.delete(family_id, chunk_hashes=pool[0].base.chunk_hashes)
    assert pool[0].segment_key not in {a.segment_key for a in client.find_anchors(family_id, "question")}
    with pytest.raises(NotFoundError, match="admit it first"):
        client.record_anchor(family_id, "question", keys[2], _delta(client, rng, family_id, 2, "a1"))
    with pytest.raises(FailedPreconditionError, match="not every chunk is a committed entry"):
        client.record_anchor(family_id, "question", keys[5], AnchorDelta("a1", "agent-a", (b"\7" * 32,), (), 0))


def test_the_byte_budget_holds_under_tenfold_oversubscription(server_factory, rng):
    one = TINY.slab_bytes(Kind.K, 64) * 2 * TINY.num_layers + \
        TINY.slab_bytes(Kind.K, 16) * 2 * TINY.num_layers
    budget = 4 * one
    srv = server_factory("--memory-bytes", "64MiB", "--anchor-pool-bytes", str(budget))
    with CacheClient(srv.address) as client:
        client.wait_ready()
        family_id = client.register_model("agent-a", "aaaa0001", TINY).family_id
        recorded = []
        for i in range(40):                                           # 10x the budget
            key, base = _anchor(client, rng, family_id, i)
            client.admit_anchor(family_id, "question", key, base)
            delta = _delta(client, rng, family_id, i, "a1")
            client.record_anchor(family_id, "question", key, delta)
            recorded.append(delta)
            used = client.stats()["counters"]["anchor_pool_bytes"]
            assert 0 < used <= budget, (i, used, budget)
        pool = client.find_anchors(family_id, "question")
        assert len(pool) == 4 and all(a.size_bytes == one for a in pool)
        # Evicted deltas' entries are gone from the node; kept ones are there.
        kept = {d.placeholder_hashes for a in pool for d in a.deltas.values()}
        for delta in recorded:
            hit = client.lookup(family_id, list(delta.placeholder_hashes), producers=["agent-a"])
            assert bool(hit.hits and hit.hits[0].num_chunks) == (delta.placeholder_hashes in kept)
        big = _delta(client, rng, family_id, 99, "a2", length=400)   # 416 tokens of K/V > 4 x 80
        with pytest.raises(ResourceExhaustedError, match="exceeds the pool's budget"):
            client.record_anchor(family_id, "question", pool[-1].segment_key, big)


def test_anchors_survive_a_restart(server_factory, tmp_path, rng):
    srv = server_factory("--memory-bytes", "64MiB", workdir=tmp_path / "node")
    with CacheClient(srv.address) as client:
        client.wait_ready()
        family_id = client.register_model("agent-a", "aaaa0001", TINY).family_id
        key, base = _anchor(client, rng, family_id, 1)
        client.admit_anchor(family_id, "question", key, base)
        client.record_anchor(family_id, "question", key, _delta(client, rng, family_id, 1, "a1"))
        client.activate_anchors(family_id, "question", [key])
        before = client.find_anchors(family_id, "question")
    assert srv.stop() == 0
    srv.start()
    with CacheClient(srv.address) as client:
        client.wait_ready()
        after = client.find_anchors(family_id, "question")
        assert [(a.segment_key, a.activations, a.deltas) for a in after] == \
            [(a.segment_key, a.activations, a.deltas) for a in before]
        assert client.stats()["counters"]["anchor_pool_bytes"] == before[0].size_bytes > 0
