"""End to end through a real server process and the SDK."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachesvc_client import AsyncCacheClient, CacheClient, DType, FailedPreconditionError, Kind
from conftest import TINY, make_entry, same_bytes

THIRTY = dataclasses.replace(TINY, num_layers=30, num_kv_heads=1, head_dim=8, hidden_size=16,
                             tokenizer_fingerprint="thirty")


def test_put_get_64_entries_30_layers_kve_byte_identical(client: CacheClient, rng):
    """Issue target: 64 entries × 30 layers × (K, V, E) × 256 tokens round-trip exactly."""
    reg = client.register_model("producer", "0123abcd", THIRTY)
    hashes = client.hash_tokens(list(range(64 * 256)), reg.family_id)
    entries = [make_entry(rng, THIRTY, h, 256) for h in hashes]
    put = client.put(reg.family_id, "producer", entries)
    assert put.entries_committed == 64
    hit = client.lookup(reg.family_id, hashes, consumer="producer").best()
    assert hit is not None and hit.num_chunks == 64 and hit.same_model
    got = client.get(reg.family_id, hit.entries, (Kind.K, Kind.V, Kind.E))
    assert got.complete and got.valid_chunks == 64
    for kind in (Kind.K, Kind.V, Kind.E):
        arr = got.arrays[kind]
        assert arr.shape == (30, 64 * 256, *THIRTY.slab_shape(kind, 1)[1:])
        for i, entry in enumerate(entries):
            for layer in range(30):
                assert same_bytes(arr[layer, i * 256:(i + 1) * 256], entry.slabs[(kind, layer)])
    again = client.put(reg.family_id, "producer", entries[:4])   # idempotent
    assert (again.entries_committed, again.already_present, again.bytes_sent) == (0, 4, 0)


def test_layer_range_and_partial_hit_and_trailing_chunk(client: CacheClient, rng):
    reg = client.register_model("p", "0123abcd", TINY)
    tokens = list(range(3 * 256 + 100))            # 3 full chunks + a 100-token tail
    full = client.hash_tokens(tokens, reg.family_id)
    assert len(full) == 3                          # the trailing partial chunk is not hashed
    entries = [make_entry(rng, TINY, h, 256) for h in full[:2]]
    client.put(reg.family_id, "p", entries)
    hit = client.lookup(reg.family_id, full).best()
    assert hit.num_chunks == 2                     # partial hit: first 2 of 3 chunks
    got = client.get(reg.family_id, hit.entries, (Kind.E,), (1, 3))
    assert got.arrays[Kind.E].shape == (2, 512, 16)
    assert same_bytes(got.arrays[Kind.E][1, 256:], entries[1].slabs[(Kind.E, 2)])


def test_partial_chunk_entry_can_be_stored_explicitly(client: CacheClient, rng):
    from cachesvc.wire.keys import chunk_hashes
    reg = client.register_model("p", "0123abcd", TINY)
    hashes = chunk_hashes(list(range(300)), reg.family_id, include_partial=True)
    entries = [make_entry(rng, TINY, hashes[0], 256), make_entry(rng, TINY, hashes[1], 44)]
    client.put(reg.family_id, "p", entries)
    hit = client.lookup(reg.family_id, hashes).best()
    assert [e.layout.num_tokens for e in hit.entries] == [256, 44]
    got = client.get(reg.family_id, hit.entries, (Kind.V,), (0, 1))
    assert got.arrays[Kind.V].shape == (1, 300, 2, 8)
    assert same_bytes(got.arrays[Kind.V][0, 256:], entries[1].slabs[(Kind.V, 0)])


def test_a_prompt_reaches_a_stored_context_that_ends_mid_chunk(client: CacheClient, rng):
    """Issue 13: a context of 2 chunks + 44 tokens stored with its partial chunk (and its
    parent); prompts of that context plus a question hit all 556 tokens (not 512) in one
    lookup, whatever chunk the question ends in; a longer stored tail is preferred, another
    producer's run is cut where it stops, a prompt that leaves the context before its end
    reaches only the full chunks, an offer whose tokens differ is never taken, and a
    partial chunk put without a parent is found only by the tail-candidates probe."""
    from cachesvc.wire.keys import chain_root, chunk_hashes, tail_hashes
    reg = client.register_model("p", "0123abcd", TINY)
    client.register_model("q", "0123abce", TINY)
    context = list(range(556))
    hashes = chunk_hashes(context, reg.family_id, include_partial=True)
    sizes = [256, 256, 44]

    def entry(chunk_hash, tokens, parent=b""):
        return dataclasses.replace(make_entry(rng, TINY, chunk_hash, tokens), parent_hash=parent)
    client.put(reg.family_id, "p", [entry(h, n, hashes[1] if n < 256 else b"")
                                    for h, n in zip(hashes, sizes, strict=True)])
    client.put(reg.family_id, "q", [entry(hashes[0], 256)])
    for question in (list(range(9000, 9030)), list(range(9000, 9300))):
        result = client.lookup_prompt(reg.family_id, context + question)
        assert [e.layout.num_tokens for e in result.best("p").entries] == sizes
        assert result.best("q").num_chunks == 1
    shorter = chunk_hashes(context[:530], reg.family_id, include_partial=True)[-1]
    client.put(reg.family_id, "p", [entry(shorter, 18, hashes[1])])
    assert client.lookup_prompt(reg.family_id, context + [7]).best("p").num_tokens == 556
    assert client.lookup_prompt(reg.family_id, context[:540] + [7] * 40).best("p").num_tokens == 530
    assert client.lookup_prompt(reg.family_id, context[:520] + [7] * 40).best("p").num_tokens == 512
    # A partial chunk claiming that parent but holding other tokens is offered, never taken.
    liar = chunk_hashes(context[:512] + [1] * 60, reg.family_id, include_partial=True)[-1]
    client.put(reg.family_id, "q", [entry(hashes[1], 256), entry(liar, 60, hashes[1])])
    offered = client.lookup(reg.family_id, chunk_hashes(context[:600] + [5], reg.family_id, include_partial=True),
                            offer_tails=True).best("q")
    assert offered.num_chunks == 2 and [o.layout.num_tokens for o in offered.tails] == [60]
    assert client.lookup_prompt(reg.family_id, context + [7]).best("q").num_tokens == 512
    # A context shorter than a chunk: offered after the chain's root.
    short = chunk_hashes(list(range(5000, 5100)), reg.family_id, include_partial=True)
    client.put(reg.family_id, "p", [entry(short[0], 100, chain_root("default", reg.family_id, 256))])
    assert client.lookup_prompt(reg.family_id, list(range(5000, 5120))).best("p").num_tokens == 100
    # Put without a parent: not offered; the tail candidates still find it.
    orphan_context = list(range(7000, 7300))
    orphan = chunk_hashes(orphan_context, reg.family_id, include_partial=True)
    client.put(reg.family_id, "p", [entry(orphan[0], 256), entry(orphan[1], 44)])
    prompt = orphan_context + [3] * 20
    assert client.lookup_prompt(reg.family_id, prompt).best("p").num_tokens == 256
    probe = client.lookup(reg.family_id, orphan[:1], tail_hashes=tail_hashes(orphan[0], prompt[256:511]))
    assert probe.best("p").num_tokens == 300

    async def same_through_the_async_client():
        async with AsyncCacheClient(client.target) as ac:
            await ac.wait_ready()
            result = await ac.lookup_prompt(reg.family_id, context + list(range(9000, 9030)))
            return result.best("p").num_tokens, result.best("q").num_tokens
    assert asyncio.run(same_through_the_async_client()) == (556, 512)


def test_torch_in_and_out_and_into_caller_buffers(client: CacheClient):
    reg = client.register_model("p", "0123abcd", TINY)
    h = client.hash_tokens(list(range(256)), reg.family_id)[0]
    g = torch.Generator().manual_seed(3)
    slabs = {(k, layer): torch.randn(TINY.slab_shape(k, 256), generator=g).to(torch.bfloat16)
             for k in (Kind.K, Kind.V) for layer in range(4)}
    from cachesvc_client import EntryData
    client.put(reg.family_id, "p", [EntryData(h, slabs)])
    hit = client.lookup(reg.family_id, [h]).best()
    out = {Kind.K: torch.zeros((4, 256, 2, 8), dtype=torch.bfloat16)}
    got = client.get(reg.family_id, hit.entries, (Kind.K,), out=out)
    assert got.arrays[Kind.K] is out[Kind.K]       # written in place
    for layer in range(4):
        assert torch.equal(out[Kind.K][layer], slabs[(Kind.K, layer)])
    as_t = client.get(reg.family_id, hit.entries, (Kind.V,), as_torch=True).arrays[Kind.V]
    assert as_t.dtype == torch.bfloat16 and torch.equal(as_t[2], slabs[(Kind.V, 2)])
    with pytest.raises(ValueError, match="dtype"):
        client.get(reg.family_id, hit.entries, (Kind.K,), out={Kind.K: torch.zeros((4, 256, 2, 8))})


def test_consumer_of_another_family_is_refused(client: CacheClient, rng):
    reg = client.register_model("base", "0123abcd", TINY)
    other = dataclasses.replace(TINY, num_kv_heads=4, tokenizer_fingerprint="other")
    client.register_model("stranger", "89abcdef", other)
    h = client.hash_tokens(list(range(256)), reg.family_id)
    client.put(reg.family_id, "base", [make_entry(rng, TINY, h[0], 256)])
    with pytest.raises(FailedPreconditionError, match="stranger.*family"):
        client.lookup(reg.family_id, h, consumer="stranger")
    client.register_model("finetune", "fedcba98", TINY)   # same family: shares
    hit = client.lookup(reg.family_id, h, consumer="finetune").best()
    assert hit.producer == "base" and not hit.same_model and hit.num_chunks == 1


def test_async_client_round_trip(server, rng):
    async def main():
        async with AsyncCacheClient(server.address) as ac:
            await ac.wait_ready()
            reg = await ac.register_model("p", "0123abcd", TINY)
            hashes = await ac.hash_tokens(list(range(4 * 256)), reg.family_id)
            entries = [make_entry(rng, TINY, h, 256) for h in hashes]
            put = await ac.put(reg.family_id, "p", entries)
            hit = (await ac.lookup(reg.family_id, hashes)).best()
            gets = await asyncio.gather(*(ac.get(reg.family_id, hit.entries, (k,), transport=t)
                                          for k, t in zip(Kind, ("grpc", "tcp", "shm"), strict=True)))
            more = await ac.put(reg.family_id, "p", [make_entry(rng, TINY, h, 256) for h in
                                                     await ac.hash_tokens(list(range(9, 9 + 512)),
                                                                          reg.family_id)],
                                transport="tcp")
            assert more.entries_committed == 2
            return put, entries, gets
    put, entries, gets = asyncio.run(main())
    assert put.entries_committed == 4
    for kind, got in zip(Kind, gets, strict=True):
        assert got.valid_chunks == 4
        assert same_bytes(got.arrays[kind][3, 256:512], entries[1].slabs[(kind, 3)])


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="cachesvc.v1.CacheService"), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert "cachesvc.v1.CacheService" in names


def test_pin_delete_list_stats(client: CacheClient, rng):
    reg = client.register_model("p", "0123abcd", TINY)
    hashes = client.hash_tokens(list(range(3 * 256)), reg.family_id)
    client.put(reg.family_id, "p", [make_entry(rng, TINY, h, 256) for h in hashes])
    hit = client.lookup(reg.family_id, hashes).best()
    lease = client.pin(reg.family_id, [e.entry_id for e in hit.entries[:1]], ttl_s=30)
    rows, token = client.list_entries(family_id=reg.family_id, limit=2)
    assert len(rows) == 2 and token
    rows2, token2 = client.list_entries(family_id=reg.family_id, limit=2, page_token=token)
    assert len(rows2) == 1 and not token2
    assert sum(r.pinned for r in rows + rows2) == 1
    client.unpin(lease)
    assert client.delete(reg.family_id, chunk_hashes=hashes[1:]) == 2
    assert client.lookup(reg.family_id, hashes).best().num_chunks == 1
    s = client.stats()
    assert s["entries"] == 1 and s["counters"]["entries_deleted"] == 2
    assert s["memory"]["used_bytes"] > 0 and s["memory"]["capacity_bytes"] == 256 << 20


def test_float32_family(client: CacheClient, rng):
    fam = dataclasses.replace(TINY, dtype=DType.FLOAT32, tokenizer_fingerprint="f32")
    reg = client.register_model("p32", "0123abcd", fam)
    h = client.hash_tokens(list(range(256)), reg.family_id)
    entry = make_entry(rng, fam, h[0], 256)
    client.put(reg.family_id, "p32", [entry])
    got = client.get(reg.family_id, client.lookup(reg.family_id, h).best().entries, (Kind.E,))
    assert got.arrays[Kind.E].dtype == np.float32
    np.testing.assert_array_equal(got.arrays[Kind.E][2], entry.slabs[(Kind.E, 2)])


def test_family_spec_is_fetched_by_a_fresh_client(server, client, rng):
    reg = client.register_model("p", "0123abcd", TINY)
    h = client.hash_tokens(list(range(256)), reg.family_id)
    client.put(reg.family_id, "p", [make_entry(rng, TINY, h[0], 256)])
    with CacheClient(server.address) as fresh:    # never registered anything itself
        assert fresh.family(reg.family_id) == TINY
        hit = fresh.lookup(reg.family_id, h).best()
        assert fresh.get(reg.family_id, hit.entries).valid_chunks == 1



def test_async_client_typed_errors(server):
    from cachesvc_client import FailedPreconditionError, NotFoundError

    async def main():
        async with AsyncCacheClient(server.address) as ac:
            reg = await ac.register_model("p", "0123abcd", TINY)
            with pytest.raises(NotFoundError, match="family 'f+' is not known"):
                await ac.lookup("f" * 32, [b"\0" * 32])
            with pytest.raises(FailedPreconditionError, match="other weights"):
                await ac.register_model("p", "99999999", TINY)
            return reg
    assert asyncio.run(main()).created


def test_async_pin_list(server, rng):
    async def main():
        async with AsyncCacheClient(server.address) as ac:
            reg = await ac.register_model("p", "0123abcd", TINY)
            hashes = await ac.hash_tokens(list(range(512)), reg.family_id)
            await ac.put(reg.family_id, "p", [make_entry(rng, TINY, h, 256) for h in hashes])
            hit = (await ac.lookup(reg.family_id, hashes)).best()
            lease = await ac.pin(reg.family_id, hit.entry_ids, ttl_s=30)
            rows, _ = await ac.list_entries(family_id=reg.family_id)
            await ac.unpin(lease)
            rows_after, _ = await ac.list_entries(family_id=reg.family_id)
            return await ac.list_models(), rows, rows_after
    models, rows, rows_after = asyncio.run(main())
    assert [m["model_id"] for m in models] == ["p"]
    assert [r.pinned for r in rows] == [True, True] and not any(r.pinned for r in rows_after)


def test_sdk_works_without_torch(server):
    """torch is optional: with it unimportable, numpy puts and gets still work."""
    code = f"""
import sys
sys.modules["torch"] = None          # any `import torch` now fails
sys.path.insert(0, {str(Path(__file__).parent)!r})
import numpy as np
from conftest import TINY, make_entry
from cachesvc_client import CacheClient, Kind
c = CacheClient({server.address!r})
fid = c.register_model("p", "0123abcd", TINY).family_id
h = c.hash_tokens(list(range(256)), fid)
e = make_entry(np.random.default_rng(0), TINY, h[0], 256)
c.put(fid, "p", [e])
got = c.get(fid, c.lookup(fid, h).best(), (Kind.K,))
assert got.arrays[Kind.K][1].tobytes() == e.slabs[(Kind.K, 1)].tobytes()
try:
    c.get(fid, c.lookup(fid, h).best(), (Kind.K,), as_torch=True)
except ImportError:
    print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
