"""Segment sources on a real node: spans of stored prompts registered without a copy,
checked against committed entries, dropped when their entries go, bounded, journaled."""

from __future__ import annotations

import dataclasses

import pytest

from cachesvc.wire.segments import SegmentSource, pack_prefix
from cachesvc_client import CacheClient, FailedPreconditionError, InvalidArgumentError, NotFoundError
from conftest import TINY, make_entry


def _store_prompt(client: CacheClient, rng, family_id: str, producer: str, tokens: list[int]) -> list[bytes]:
    hashes = client.hash_tokens(tokens, family_id, include_partial=True)
    sizes = [min(256, len(tokens) - 256 * i) for i in range(len(hashes))]
    client.put(family_id, producer, [make_entry(rng, TINY, h, n) for h, n in zip(hashes, sizes, strict=True)])
    return hashes


def test_a_span_of_a_stored_prompt_is_found_by_content(client, rng):
    family_id = client.register_model("agent-a", "aaaa0001", TINY).family_id
    prefix, content = list(range(1000, 1300)), list(range(5, 205))
    hashes = _store_prompt(client, rng, family_id, "agent-a", prefix + content)
    key = client.segment_key(content, family_id)
    assert key == client.segment_key(content, family_id) != client.segment_key(content[1:], family_id)
    source = SegmentSource("agent-a", tuple(hashes), len(prefix), len(content), pack_prefix(prefix))
    assert client.put_segment(family_id, key, source) == 1
    assert client.put_segment(family_id, key, source) == 1          # the same span again: no duplicate
    [[found], []] = client.find_segments(family_id, [key, client.segment_key([1, 2], family_id)])
    assert found == source and found.prefix() == prefix
    assert client.stats()["counters"]["segment_sources"] == 1
    # Its entries deleted: the source is dead, and a find drops it rather than hand it out.
    client.delete(family_id, chunk_hashes=hashes[1:])
    assert client.find_segments(family_id, [key]) == [[]]
    assert client.stats()["counters"]["segment_sources"] == 0


def test_bad_sources_are_refused_precisely(client, rng):
    family_id = client.register_model("agent-a", "aaaa0001", TINY).family_id
    other = client.register_model("other", "bbbb0001", dataclasses.replace(TINY, num_layers=2)).family_id
    tokens = list(range(300))
    hashes = _store_prompt(client, rng, family_id, "agent-a", tokens)
    key = client.segment_key(tokens[100:200], family_id)
    with pytest.raises(FailedPreconditionError, match="not every chunk of its chain is a committed entry"):
        client.put_segment(family_id, key, SegmentSource("agent-a", (b"\1" * 32,), 0, 10))
    with pytest.raises(InvalidArgumentError, match=r"spans tokens \[250, 350\) but its chain holds 300"):
        client.put_segment(family_id, key, SegmentSource("agent-a", tuple(hashes), 250, 100))
    with pytest.raises(InvalidArgumentError, match="segment_key must be 32 bytes"):
        client.put_segment(family_id, b"short", SegmentSource("agent-a", tuple(hashes), 0, 10))
    with pytest.raises(NotFoundError):
        client.put_segment(family_id, key, SegmentSource("nobody", tuple(hashes), 0, 10))
    with pytest.raises(FailedPreconditionError, match="cannot be reused here"):
        client.put_segment(other, key, SegmentSource("agent-a", tuple(hashes), 0, 10))
    assert client.find_segments(family_id, [key]) == [[]]          # nothing partial became visible
    assert client.stats()["counters"]["segment_sources"] == 0


def test_sources_are_bounded_and_survive_a_restart(server_factory, tmp_path, rng):
    srv = server_factory("--memory-bytes", "64MiB", "--segment-sources", "3", workdir=tmp_path / "node")
    with CacheClient(srv.address) as client:
        client.wait_ready()
        family_id = client.register_model("agent-a", "aaaa0001", TINY).family_id
        keys = []
        for i in range(5):
            tokens = [i * 1000 + t for t in range(120)]
            hashes = _store_prompt(client, rng, family_id, "agent-a", tokens)
            keys.append(client.segment_key(tokens[20:], family_id))
            client.put_segment(family_id, keys[-1], SegmentSource("agent-a", tuple(hashes), 20, 100))
        assert client.stats()["counters"]["segment_sources"] == 3
        assert [bool(f) for f in client.find_segments(family_id, keys)] == [False, False, True, True, True]
    assert srv.stop() == 0
    srv.start()
    with CacheClient(srv.address) as client:
        client.wait_ready()
        assert [len(f) for f in client.find_segments(family_id, keys)] == [0, 0, 1, 1, 1]


def test_segment_counters_reach_prometheus(server_factory, rng):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    srv = server_factory("--memory-bytes", "64MiB", "--metrics-port", "0")
    with CacheClient(srv.address) as client:
        client.wait_ready()
        family_id = client.register_model("agent-a", "aaaa0001", TINY).family_id
        tokens = list(range(300))
        hashes = _store_prompt(client, rng, family_id, "agent-a", tokens)
        key = client.segment_key(tokens[50:250], family_id)
        client.put_segment(family_id, key, SegmentSource("agent-a", tuple(hashes), 50, 200))
        client.find_segments(family_id, [key])
    url = f"http://127.0.0.1:{srv.serving('metrics_port')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        samples = {s.name: s.value for family in text_string_to_metric_families(answer.read().decode())
                   for s in family.samples}
    assert samples["cachesvc_segment_puts_total"] == 1 and samples["cachesvc_segment_hits_total"] == 1
    assert samples["cachesvc_segment_sources"] == 1 and samples["cachesvc_anchor_pool_bytes"] == 0
