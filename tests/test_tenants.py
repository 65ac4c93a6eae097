"""Tenant isolation on a real node: every lookup, read, pin, delete and listing path,
given another tenant's hashes and entry ids, finds nothing and touches nothing; and a
foreign tenant's lookup of hashes another tenant holds takes as long as one of hashes
nobody holds (issue 17, part 1's targets; tenants are still self-declared: tokens that
bind a client to its tenant are not built yet)."""

from __future__ import annotations

import random
import statistics
import time

from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc_client import ArenaReader, CacheClient, Kind
from conftest import TINY, make_entry, same_bytes


def test_another_tenants_hashes_and_ids_reach_nothing(client: CacheClient, rng):
    fid = client.register_model("m", "0123abcd", TINY).family_id
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


def test_a_foreign_lookup_does_not_time_a_hit(client: CacheClient, rng):
    """Beta looks up hashes alpha holds and hashes nobody holds, interleaved: the two take
    the same time, because beta's lookup never reaches alpha's index. Printed, and
    checked against the run's own noise (the spread of the same lookup)."""
    fid = client.register_model("m", "0123abcd", TINY).family_id
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
