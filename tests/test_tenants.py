"""Tenant isolation on a real node: every lookup, read, pin, delete and listing path,
given another tenant's hashes and entry ids, finds nothing and touches nothing; so do
the model, profile, segment and anchor RPCs given another tenant's names and keys; and
a foreign tenant's lookup of hashes another tenant holds takes as long as one of hashes
nobody holds (issue 17, part 1's targets). Tenants are self-declared here; tokens that
bind a caller to its tenant are tests/test_auth.py."""

from __future__ import annotations

import random
import statistics
import time

import pytest

from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.wire.segments import AnchorDelta, SegmentSource
from cachesvc_client import ArenaReader, CacheClient, FailedPreconditionError, Kind, NotFoundError
from conftest import TINY, make_entry, same_bytes


def test_another_tenants_hashes_and_ids_reach_nothing(client: CacheClient, rng):
    fid = client.register_model("m", "0123abcd", TINY, tenant="alpha").family_id
    tokens = list(range(768))
    owner = client.hash_tokens(tokens, fid, tenant="alpha")
    entries = [make_entry(rng, TINY, h, 256) for h in owner]
    client.put(fid, "m", entries, tenant="alpha")
    hit = client.lookup(fid, owner, tenant="alpha", locate=True).best()
    assert hit.num_chunks == 3
    # Tenant beta: its own hashes of the same tokens differ, and alpha's hashes miss.
    assert not set(client.hash_tokens(tokens, fid, tenant="beta")) & set(owner)
    for locate in (False, True):
        assert client.lookup(fid, owner, tenant="beta", locate=locate).hits == []
    assert client.lookup_prompt(fid, tokens, tenant="beta").hits == []
    for transport in ("grpc", "tcp", "shm"):
        got = client.get(fid, hit, (Kind.K, Kind.V, Kind.E), tenant="beta", transport=transport)
        assert got.valid_chunks == 0 and got.bytes_received == 0
        assert {m.reason for m in got.missing} == {"entry not found"}
    stream = client.stream_selections(fid, hit, [((Kind.E,), (1, 2)), ((Kind.K,), (0, 1))], tenant="beta",
                                      transport="tcp")
    assert list(stream) and all(s.valid_chunks == 0 and s.bytes_received == 0 for s in stream.results())
    assert client.list_entries(family_id=fid, tenant="beta")[0] == []
    pinned = client._call(client._stub.Pin, pb.PinRequest(tenant="beta", family_id=fid, entry_ids=hit.entry_ids,
                                                          ttl_s=5))
    assert pinned.entries_pinned == 0
    client.unpin(pinned.lease_id)
    assert client.delete(fid, entry_ids=hit.entry_ids, tenant="beta") == 0
    assert client.delete(fid, chunk_hashes=owner, tenant="beta") == 0
    # Alpha still has every byte.
    got = client.get(fid, client.lookup(fid, owner, tenant="alpha").best(), (Kind.K,), tenant="alpha")
    assert got.valid_chunks == 3
    for layer in range(TINY.num_layers):
        for i, entry in enumerate(entries):
            assert same_bytes(got.arrays[Kind.K][layer, i * 256:(i + 1) * 256], entry.slabs[(Kind.K, layer)])
    # A located hit's checksums are alpha's to read; beta's lookup hands out none.
    assert ArenaReader(client.arena(hit), TINY, hit).in_memory == 3


def test_a_client_that_did_not_register_finds_its_tenants_model(server, client: CacheClient, rng):
    """A worker's own client learns the family's shape from the tenant it calls for (the
    soak's workers once asked the default tenant, which has no model, and every put failed)."""
    fid = client.register_model("m", "0123abcd", TINY, tenant="alpha").family_id
    (chunk,) = client.hash_tokens(list(range(256)), fid, tenant="alpha")
    entry = make_entry(rng, TINY, chunk, 256)
    with CacheClient(server.address) as worker:
        assert worker.put(fid, "m", [entry], tenant="alpha").entries_committed == 1
        got = worker.get(fid, worker.lookup(fid, [chunk], tenant="alpha").best(), (Kind.V,), tenant="alpha")
        assert got.valid_chunks == 1 and same_bytes(got.arrays[Kind.V][0], entry.slabs[(Kind.V, 0)])
    with CacheClient(server.address) as stranger, pytest.raises(NotFoundError, match="no registered model"):
        stranger.put(fid, "m", [entry], tenant="beta")


def test_another_tenants_models_profiles_segments_and_anchors_reach_nothing(client: CacheClient, rng):
    fid = client.register_model("p", "0123abcd", TINY, tenant="alpha").family_id
    client.register_model("c", "4567abcd", TINY, tenant="alpha")
    client.put_profile("p", "c", "0123abcd", "4567abcd", {"plans": ["[0,1)"]}, tenant="alpha")
    tokens = list(range(300))
    hashes = tuple(client.hash_tokens(tokens, fid, tenant="alpha", include_partial=True))
    client.put(fid, "p", [make_entry(rng, TINY, h, n) for h, n in zip(hashes, (256, 44), strict=True)],
               tenant="alpha")
    key = client.segment_key(tokens[100:200], fid, tenant="alpha")
    span = SegmentSource("p", hashes, 100, 100)
    client.put_segment(fid, key, span, tenant="alpha")
    base = SegmentSource("p", hashes, 0, 300)
    anchor = client.segment_key(tokens, fid, tenant="alpha")
    assert client.admit_anchor(fid, "doc", anchor, base, tenant="alpha") == (True, [])
    client.record_anchor(fid, "doc", anchor, AnchorDelta("a1", "p", hashes, (), 0), tenant="alpha")

    # Beta sees none of alpha's models or profiles, by listing or by name.
    assert client.list_models(tenant="beta") == [] and client.list_profiles(tenant="beta") == []
    with pytest.raises(NotFoundError):
        client._call(client._stub.GetModel, pb.GetModelRequest(model_id="p", tenant="beta"))
    with pytest.raises(NotFoundError):
        client.get_profile("p", "c", tenant="beta")
    with pytest.raises(NotFoundError):
        client.flag_profile("p", "c", "drift", tenant="beta")
    # Nor alpha's segments or anchors: by alpha's keys, or by pointing at alpha's chains.
    assert client.find_segments(fid, [key], tenant="beta") == [[]]
    assert client.segment_key(tokens[100:200], fid, tenant="beta") != key
    assert client.find_anchors(fid, "doc", tenant="beta") == []
    assert client.activate_anchors(fid, "doc", [anchor], tenant="beta") == 0
    for call in (lambda: client.put_segment(fid, key, span, tenant="beta"),
                 lambda: client.admit_anchor(fid, "doc", anchor, base, tenant="beta")):
        with pytest.raises(NotFoundError, match="model 'p' is not registered"):
            call()
    # Beta's own "p" (other weights) is another model: alpha's chains are still not its.
    assert client.register_model("p", "ffff0000", TINY, tenant="beta").created
    for call in (lambda: client.put_segment(fid, key, span, tenant="beta"),
                 lambda: client.admit_anchor(fid, "doc", anchor, base, tenant="beta"),
                 lambda: client.record_anchor(fid, "doc", anchor, AnchorDelta("a1", "p", hashes, (), 0),
                                              tenant="beta")):
        with pytest.raises(FailedPreconditionError, match="committed entry"):
            call()
    with pytest.raises(NotFoundError):
        client.put_profile("p", "c", "ffff0000", "4567abcd", {"plans": []}, tenant="beta")
    assert client.find_anchors(fid, "doc", tenant="beta") == []

    # Alpha still has all of it, its model's weights unchanged by beta's registration.
    assert [(m["model_id"], m["weights_digest"]) for m in client.list_models(tenant="alpha")] == \
        [("c", "4567abcd"), ("p", "0123abcd")]
    assert client.get_profile("p", "c", tenant="alpha").document == {"plans": ["[0,1)"]}
    assert client.find_segments(fid, [key], tenant="alpha") == [[span]]
    [found] = client.find_anchors(fid, "doc", tenant="alpha")
    assert found.segment_key == anchor and found.activations == 0


def test_a_foreign_lookup_does_not_time_a_hit(client: CacheClient, rng):
    """Beta looks up hashes alpha holds and hashes nobody holds, interleaved: the two take
    the same time, because beta's lookup never reaches alpha's index. Printed, and
    checked against the run's own noise (the spread of the same lookup)."""
    fid = client.register_model("m", "0123abcd", TINY, tenant="alpha").family_id
    held = client.hash_tokens(list(range(256 * 32)), fid, tenant="alpha")
    client.put(fid, "m", [make_entry(rng, TINY, h, 256, kinds=(Kind.K,), layers=range(1)) for h in held],
               tenant="alpha")
    unheld = client.hash_tokens(list(range(10**6, 10**6 + 256 * 32)), fid, tenant="alpha")
    assert client.lookup(fid, held, tenant="alpha").best().num_chunks == 32
    order = random.Random(3)
    samples: dict[str, list[float]] = {"held": [], "unheld": []}
    for _ in range(400):
        name = order.choice(("held", "unheld"))
        hashes = held if name == "held" else unheld
        t0 = time.perf_counter()
        assert client.lookup(fid, hashes, tenant="beta").hits == []
        samples[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    spread = statistics.median(abs(x - medians["unheld"]) for x in samples["unheld"])   # MAD
    print(f"foreign lookup of 32 held hashes {medians['held'] * 1e3:.3f} ms, of 32 unheld "
          f"{medians['unheld'] * 1e3:.3f} ms, noise (MAD) {spread * 1e3:.3f} ms")
    assert abs(medians["held"] - medians["unheld"]) <= max(2 * spread, 20e-6)


def test_records_written_before_models_had_tenants_are_the_default_tenants(tmp_path):
    """A node upgraded in place keeps its models (models.json without tenants) and a
    cluster keeps its Redis fields (``MODEL`` / ``PRODUCER␟CONSUMER``): both are read as
    the default tenant's, which is where they were written."""
    import json

    from cachesvc.node.models import ModelRegistry
    from cachesvc.wire.cluster import model_field, profile_field, split_field
    from cachesvc.wire import errors
    from cachesvc.wire.keys import DEFAULT_TENANT
    path = tmp_path / "models.json"
    registry = ModelRegistry(path)
    registry.register("m", "abcdef01", TINY, False, tenant=DEFAULT_TENANT)
    registry.flush()
    docs = json.loads(path.read_text())
    path.write_text(json.dumps([{k: v for k, v in d.items() if k != "tenant"} for d in docs]))
    assert ModelRegistry(path).get("m", tenant=DEFAULT_TENANT).weights_digest == "abcdef01"
    with pytest.raises(errors.NotFound, match="not registered"):
        ModelRegistry(path).get("m", tenant="alpha")
    assert split_field(model_field("alpha", "m"), 2) == ("alpha", "m")
    assert split_field(b"m", 2) == (DEFAULT_TENANT, "m")
    assert split_field(profile_field("alpha", "p", "c"), 3) == ("alpha", "p", "c")
    assert split_field("p\x1fc", 3) == (DEFAULT_TENANT, "p", "c")
    for bad in ("", "a\x1fb\x1fc", "\x1f"):
        with pytest.raises(ValueError):
            split_field(bad, 2)
