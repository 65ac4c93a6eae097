"""Same-host reads with no fetch: a locating lookup (over the node's Unix socket) says
where each entry lies in the node's memory tier, and the reader copies slabs straight
out of the arena it mapped, verifying each against the checksum the lookup returned
(real server processes)."""

from __future__ import annotations

import dataclasses
import mmap
import os
import random
import socket

import numpy as np
import pytest
import torch
import xxhash

from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.wire.protocol import FrameType, Op, pack_request, read_frame
from cachesvc_client import (ArenaReader, CacheClient, ClientOptions, DType, Hit, InvalidArgumentError, Kind,
                             Location, NotFoundError)
from cachesvc_client import local
from cachesvc_client.local import GROUP_BYTES, _strided_groups, copy_and_digest
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
from cachesvc_connectors.hf.loader import HeldArenaLoader
from cachesvc_connectors.reuse import CostModel
from cachesvc_connectors.reuse.plan import Plan
from conftest import TINY, make_entry
from hf_models import fine_tune_of, last_logits, tiny_model, tokenizer

FP32 = DType.FLOAT32


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(255) for _ in range(n)]


def _register(client: CacheClient) -> str:
    return client.register_model("p", "0123abcd", TINY).family_id


def _flat(n_bytes: int) -> np.ndarray:
    return np.zeros(n_bytes, np.uint8)


def _layer_bytes(hit: Hit, kind: Kind) -> int:
    return sum(TINY.slab_bytes(kind, lay.num_tokens) for lay in hit.layouts)


def test_a_located_hit_reads_the_same_bytes_as_a_fetch(client: CacheClient, rng):
    fid = _register(client)
    tokens = list(range(3 * 256 + 40))
    hashes = client.hash_tokens(tokens, fid, include_partial=True)
    sizes = [256, 256, 256, 40]
    entries = [make_entry(rng, TINY, h, n) for h, n in zip(hashes, sizes, strict=True)]
    entries[3] = dataclasses.replace(entries[3], parent_hash=hashes[2])   # the partial chunk, offered
    client.put(fid, "p", entries)
    plain = client.lookup_prompt(fid, tokens).best()
    assert plain.locations is None                      # only a locating lookup says where
    hit = client.lookup_prompt(fid, tokens, locate=True).best()
    assert hit.num_tokens == len(tokens) and hit.locations is not None
    assert [len(loc.checksums) for loc in hit.locations] == [lay.num_slabs for lay in hit.layouts]
    arena = client.arena(hit)
    assert arena is not None
    reader = ArenaReader(arena, TINY, hit)
    for kind in (Kind.K, Kind.V, Kind.E):
        fetched = client.get(fid, hit, [kind], transport="grpc").arrays[kind]
        for layer in range(TINY.num_layers):
            out = _flat(_layer_bytes(hit, kind))
            assert reader.read(kind, layer, out, hit.num_chunks) == hit.num_chunks
            assert out.tobytes() == fetched[layer].tobytes()


@pytest.fixture
def memory_only(server_factory):
    """A node without a disk tier: a deleted entry's memory is free at once (no spill
    holds it), so the next put of the same size lands there (first fit)."""
    with CacheClient(server_factory("--memory-bytes", "64MiB", "--disk-mode", "off").address) as c:
        yield c


def test_memory_reused_after_the_lookup_is_a_miss_not_data(memory_only: CacheClient, rng):
    """Without a lease the node may evict or delete an entry and reuse its memory before
    the reader copies: the copy then fails its checksum and counts as missing."""
    client = memory_only
    fid = _register(client)
    first = client.hash_tokens(list(range(512)), fid)
    client.put(fid, "p", [make_entry(rng, TINY, h, 256) for h in first])
    hit = client.lookup(fid, first, locate=True).best()
    client.delete(fid, chunk_hashes=first)
    other = client.hash_tokens(list(range(1000, 1512)), fid)
    client.put(fid, "p", [make_entry(rng, TINY, h, 256) for h in other])
    moved_in = client.lookup(fid, other, locate=True).best()
    assert moved_in.locations[0].arena_offset == hit.locations[0].arena_offset   # the memory was reused
    reader = ArenaReader(client.arena(hit), TINY, hit)
    assert reader.read(Kind.K, 0, _flat(_layer_bytes(hit, Kind.K)), hit.num_chunks) == 0


def test_a_location_outside_the_arena_is_a_miss(client: CacheClient, rng):
    fid = _register(client)
    hashes = client.hash_tokens(list(range(512)), fid)
    client.put(fid, "p", [make_entry(rng, TINY, h, 256) for h in hashes])
    hit = client.lookup(fid, hashes, locate=True).best()
    arena = client.arena(hit)
    beyond = Location(len(arena) - 8, hit.locations[1].checksums)
    lying = Hit(hit.producer, hit.same_model, hit.entry_ids, hit.position_offsets, hit.layouts, hit.tiers,
                hit.grpc_address, (), [hit.locations[0], beyond], hit.shm)
    assert ArenaReader(arena, TINY, lying).read(Kind.V, 3, _flat(_layer_bytes(hit, Kind.V)), 2) == 1


def _stored_with_partial(client: CacheClient, rng) -> tuple[str, list[int]]:
    """Three whole chunks and a partial one (40 tokens) of one prompt, stored."""
    fid = _register(client)
    tokens = list(range(3 * 256 + 40))
    hashes = client.hash_tokens(tokens, fid, include_partial=True)
    entries = [make_entry(rng, TINY, h, n) for h, n in zip(hashes, [256, 256, 256, 40], strict=True)]
    entries[3] = dataclasses.replace(entries[3], parent_hash=hashes[2])
    client.put(fid, "p", entries)
    return fid, tokens


def test_a_held_hit_is_read_in_place_each_entry_verified(client: CacheClient, rng):
    """What an engine's writer copies straight out of the memory tier (the vLLM worker)
    is the bytes a fetch returns, entry by entry, and only the entries it asks for."""
    fid, tokens = _stored_with_partial(client, rng)
    result = client.lookup_prompt(fid, tokens, locate=True, lease_ttl_s=30)
    hit = result.best()
    loader = HeldArenaLoader(ArenaReader(client.arena(hit), TINY, hit), hit)
    fetched = client.get(fid, hit, [Kind.K, Kind.V], transport="grpc").arrays
    for layer in range(TINY.num_layers):
        pieces = list(loader.pieces(layer))
        assert [first for first, _, _ in pieces] == [0, 256, 512, 768]
        for kind, column in ((Kind.K, 1), (Kind.V, 2)):
            whole = torch.cat([piece[column] for piece in pieces])
            assert whole.shape == (len(tokens), TINY.num_kv_heads, TINY.head_dim)
            assert whole.view(torch.uint8).numpy().tobytes() == fetched[kind][layer].tobytes()
    assert [first for first, _, _ in loader.pieces(2, 300, 700)] == [256, 512]   # the entries holding them
    assert loader.join() == hit.num_chunks and loader.errors == []
    client.unpin(result.lease_id)


def test_a_held_slab_that_fails_its_checksum_ends_the_load_there(client: CacheClient, rng):
    fid, tokens = _stored_with_partial(client, rng)
    hit = client.lookup_prompt(fid, tokens, locate=True, lease_ttl_s=30).best()
    bad = hit.locations[2]
    wrong = Location(bad.arena_offset, (bad.checksums[0], bad.checksums[1] ^ 1, *bad.checksums[2:]))
    lying = Hit(hit.producer, hit.same_model, hit.entry_ids, hit.position_offsets, hit.layouts, hit.tiers,
                hit.grpc_address, (), [*hit.locations[:2], wrong, hit.locations[3]], hit.shm)
    loader = HeldArenaLoader(ArenaReader(client.arena(hit), TINY, lying), lying)
    assert [first for first, _, _ in loader.pieces(0)] == [0, 256, 512, 768]   # K0 of chunk 2 is not that slab
    assert [first for first, _, _ in loader.pieces(1)] == [0, 256]             # K1 of chunk 2 is
    assert loader.valid_chunks == 2 and "layer 1 of chunk 2: checksum mismatch" in loader.errors[0]
    assert [first for first, _, _ in loader.pieces(0)] == [0, 256]             # nothing after it any more
    assert loader.join() == 2


def test_mapping_the_memory_tier_maps_what_the_node_allocated_and_allocates_nothing(server_factory, rng):
    prefaulted = server_factory("--memory-bytes", "64MiB", "--memory-prefault", "true")
    with CacheClient(prefaulted.address) as client:
        assert client.map_memory_tier() == 64 << 20
        assert client.map_memory_tier(transport="grpc") == 0     # not on the tier's path: nothing to map
    lazy = server_factory("--memory-bytes", "64MiB", "--disk-mode", "off")
    with CacheClient(lazy.address) as client:
        fid = _register(client)
        hashes = client.hash_tokens(list(range(512)), fid)
        client.put(fid, "p", [make_entry(rng, TINY, h, 256) for h in hashes])
        mapped = client.map_memory_tier()
        assert 0 < mapped <= 4 << 20        # the pages the two entries took (a 2 MiB huge page where shmem has them)
        hit = client.lookup(fid, hashes, locate=True).best()
        reader = ArenaReader(client.arena(hit), TINY, hit)
        out = _flat(_layer_bytes(hit, Kind.V))
        assert reader.read(Kind.V, 1, out, 2) == 2               # read as before, pages already mapped
    with CacheClient(lazy.address) as client:                   # mapping allocated no page of the tier
        assert client.map_memory_tier() == mapped


@pytest.fixture(scope="module")
def pair():
    base = tiny_model("llama", seed=0)
    return base, fine_tune_of(base, range(2, 4)), tokenizer()


@torch.no_grad()
def _logits(consumer: Consumer, ids: list[int]):
    pre = consumer.prefill(ids)
    out = consumer.model(input_ids=consumer.stack.ids(ids[-1:]), past_key_values=pre.cache)
    return out.logits[0, -1], pre.report


@pytest.mark.parametrize("direct", [True, False])
def test_consumers_on_the_node_host_read_the_memory_tier_directly(client, pair, direct):
    base, tuned, tok = pair
    ids = _prompt(700, seed=21)
    Producer(client, base, tok, "base", ProducerOptions(dtype=FP32)).store(ids)
    same = Consumer(client, base, tok, "base", ConsumerOptions(dtype=FP32, direct=direct))
    logits, report = _logits(same, ids + [5, 6])
    assert report.mode == "same_model" and report.reused_tokens == 700
    assert report.transport == ("shm-direct" if direct else "shm")
    assert torch.allclose(logits, last_logits(base, ids + [5, 6]), atol=1e-4, rtol=0)
    planned = Consumer(client, tuned, tok, "tuned",
                       ConsumerOptions(dtype=FP32, default_plan=Plan(4, ((2, 4),)), direct=direct))
    logits, report = _logits(planned, ids + [5, 6])
    assert report.mode == "cross_model" and report.transport == ("shm-direct" if direct else "shm")
    assert torch.allclose(logits, last_logits(tuned, ids + [5, 6]), atol=1e-4, rtol=0)


def test_a_consumer_learns_its_fixed_costs_from_its_own_reuses(client, pair):
    base, _, tok = pair
    producer = Producer(client, base, tok, "base", ProducerOptions(dtype=FP32))
    cost = CostModel(c0=0.0, c1=0.0, c2=0.0, num_layers=4, head_s=0.0, kv_bytes_per_token=128,
                     e_bytes_per_token=256, fetch_overhead_s=10.0)   # an absurd start
    consumer = Consumer(client, base, tok, "base", ConsumerOptions(dtype=FP32, cost=cost))
    for seed in range(4):
        ids = _prompt(300 + 100 * seed, seed=30 + seed)
        producer.store(ids)
        assert consumer.prefill(ids + [1]).report.mode == "same_model"
    assert cost.learned is not None and cost.learned.requests == 4
    assert cost.fetch_overhead_s < 1.0                                 # what these reuses took


class _Churned(Consumer):
    """A consumer whose hit's memory is taken by other entries right after its lookup
    (what eviction under load does between a lookup and the copy)."""

    def __init__(self, *args, churn, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.churn = churn

    def _lookup(self, ids, producers=()):
        result = super()._lookup(ids, producers)
        self.churn()
        return result


def test_a_consumer_recomputes_what_changed_under_its_located_hit(memory_only, pair):
    client, (base, _, tok) = memory_only, pair
    ids, others = _prompt(600, seed=22), _prompt(600, seed=23)
    producer = Producer(client, base, tok, "base", ProducerOptions(dtype=FP32))
    producer.store(ids)

    located = client.lookup_prompt(producer.family_id, ids, locate=True).best()

    def churn() -> None:   # the same sizes land in the memory the hit pointed at (first fit)
        client.delete(producer.family_id, chunk_hashes=client.hash_tokens(ids, producer.family_id,
                                                                          include_partial=True))
        producer.store(others)
        moved_in = client.lookup_prompt(producer.family_id, others, locate=True).best()
        assert moved_in.locations[0].arena_offset == located.locations[0].arena_offset

    consumer = _Churned(client, base, tok, "base", ConsumerOptions(dtype=FP32), churn=churn)
    logits, report = _logits(consumer, ids + [7])
    assert report.mode == "prefill" and "checksum mismatch" in report.fallback
    assert torch.allclose(logits, last_logits(base, ids + [7]), atol=1e-4, rtol=0)


def test_entries_only_on_disk_are_fetched(server_factory, pair):
    base, _, tok = pair
    ids = _prompt(600, seed=24)
    srv = server_factory("--memory-bytes", "64MiB")
    with CacheClient(srv.address) as client:
        Producer(client, base, tok, "base", ProducerOptions(dtype=FP32)).store(ids)
    srv.stop()
    again = server_factory("--memory-bytes", "64MiB", workdir=srv.workdir)   # entries on disk now
    with CacheClient(again.address) as client:
        hit = client.lookup_prompt(client.list_models()[0]["family_id"], ids, locate=True).best()
        assert hit.locations is not None and min(loc.arena_offset for loc in hit.locations) == -1
        logits, report = _logits(Consumer(client, base, tok, "base", ConsumerOptions(dtype=FP32)), ids + [9])
        assert report.mode == "same_model" and report.transport == "shm"
        assert torch.allclose(logits, last_logits(base, ids + [9]), atol=1e-4, rtol=0)


def _endpoints(client: CacheClient) -> pb.FetchDescriptor:
    return client._call(client._stub.Stats, pb.StatsRequest()).fetch


def test_a_lookup_over_the_unix_socket_answers_what_grpc_answers(server, rng):
    with CacheClient(server.address) as local, \
            CacheClient(server.address, ClientOptions(transport="grpc")) as remote:
        fid = _register(local)
        tokens = list(range(600))
        hashes = local.hash_tokens(tokens, fid, include_partial=True)
        entries = [make_entry(rng, TINY, h, n) for h, n in zip(hashes, (256, 256, 88), strict=True)]
        entries[2] = dataclasses.replace(entries[2], parent_hash=hashes[1])
        local.put(fid, "p", entries)
        before = local.stats()["counters"]["lookups"]
        for locate in (False, True):
            assert local.lookup_prompt(fid, tokens, locate=locate) == remote.lookup_prompt(fid, tokens, locate=locate)
        assert local.stats()["counters"]["lookups"] == before + 4          # both went to the node
        for family, bad, error in (("f" * 64, hashes, NotFoundError), (fid, [b"short"], InvalidArgumentError)):
            raised = []                                                      # the same typed errors
            for via in (local, remote):
                with pytest.raises(error) as caught:
                    via.lookup(family, bad)
                raised.append(str(caught.value))
            assert raised[0] == raised[1]


@pytest.mark.parametrize("op", [Op.LOOKUP, Op.UNPIN, Op.RESERVE, Op.COMMIT])
def test_a_malformed_control_request_on_the_socket_is_answered_and_the_connection_kept(client, rng, op):
    fid = _register(client)
    hashes = client.hash_tokens(list(range(256)), fid)
    client.put(fid, "p", [make_entry(rng, TINY, hashes[0], 256)])
    name = {Op.LOOKUP: b"LookupRequest", Op.UNPIN: b"UnpinRequest", Op.RESERVE: b"ReserveRequest",
            Op.COMMIT: b"CommitRequest"}[op]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(_endpoints(client).transports["shm"].decode())
        sock.sendall(pack_request(op, b"\xff\xff\xff garbage"))
        frame = read_frame(sock)
        assert frame.type == FrameType.ERROR and frame.header.startswith(b"INVALID_ARGUMENT:bad " + name)
        sock.sendall(pack_request(Op.LOOKUP, pb.LookupRequest(family_id=fid, chunk_hashes=hashes,
                                                              lease_ttl_s=30).SerializeToString()))
        frame = read_frame(sock)                                            # the same connection still serves
        answer = pb.LookupResponse.FromString(frame.header)
        assert frame.type == FrameType.ANSWER and answer.hits[0].num_chunks == 1
        sock.sendall(pack_request(Op.UNPIN, pb.UnpinRequest(lease_id=answer.lease_id).SerializeToString()))
        assert read_frame(sock).type == FrameType.ANSWER
    address = _endpoints(client).transports["tcp"].decode()
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:                # not offered over TCP
        sock.sendall(pack_request(op, b""))
        assert read_frame(sock).header.startswith(b"FAILED_PRECONDITION:" + op.name.encode() +
                                                  b" is only offered on the Unix socket")


@pytest.mark.parametrize("rows,size,gap", [(1, 96 << 10, 0), (30, 96 << 10, 0), (3, 4099, 0), (8, 96 << 10, 5000),
                                           (30, 40000, 1)])
def test_copy_and_digest_copies_every_byte_and_hashes_the_copy(rows, size, gap):
    """Rows strided through a wider destination, from slabs back to back or ``gap`` bytes
    apart in the arena (one layer of several entries), one slab or several groups of
    GROUP_BYTES: every byte value arrives, nothing beside the rows is touched (nor
    anything between the slabs copied), and each digest is the xxh3-64 of its row."""
    stride = size + gap
    payload = np.random.default_rng(rows).integers(0, 256, rows * stride, dtype=np.uint8)
    fd = os.memfd_create("test-tier")
    try:
        os.ftruncate(fd, len(payload) + 8192)
        arena = mmap.mmap(fd, len(payload) + 8192)
    finally:
        os.close(fd)
    arena[4096:4096 + len(payload)] = payload.tobytes()
    dest = np.full((rows, 3 * size), 7, np.uint8)
    digests = copy_and_digest(arena, 4096, dest[:, size:2 * size], stride if gap else 0)
    expected = payload.reshape(rows, stride)[:, :size]
    assert np.array_equal(dest[:, size:2 * size], expected)
    assert (dest[:, :size] == 7).all() and (dest[:, 2 * size:] == 7).all()
    assert digests == [xxhash.xxh3_64_intdigest(row.tobytes()) for row in expected]


def test_a_layer_is_read_a_group_of_entries_at_a_time_and_stops_at_a_bad_slab(client: CacheClient, rng):
    """Entries of one put lie equally far apart: a layer's slabs of them are copied as one
    group (a partial chunk, smaller, as another), read back as a fetch returns them, and
    a slab in the middle of a group that fails its checksum ends the read there."""
    fid, tokens = _stored_with_partial(client, rng)
    hit = client.lookup_prompt(fid, tokens, locate=True).best()
    reader = ArenaReader(client.arena(hit), TINY, hit)
    spans = reader.spans(Kind.V, 2, 3, hit.num_chunks)
    assert [len(group) for group in _strided_groups(spans, GROUP_BYTES)] == [3, 1]
    assert [len(group) for group in _strided_groups(spans, 2 * spans[0].size)] == [2, 1, 1]
    assert [len(group) for group in _strided_groups([spans[0], spans[2], spans[1]], GROUP_BYTES)] == [2, 1]
    fetched = client.get(fid, hit, [Kind.V], transport="grpc").arrays[Kind.V][2]
    out = _flat(_layer_bytes(hit, Kind.V))
    assert reader.read(Kind.V, 2, out, hit.num_chunks) == 4 and out.tobytes() == fetched.tobytes()
    v2 = hit.layouts[1].place(TINY, Kind.V, 2)[0]   # the slab's index in its entry
    wrong = Location(hit.locations[1].arena_offset,
                     tuple(c ^ (i == v2) for i, c in enumerate(hit.locations[1].checksums)))
    lying = Hit(hit.producer, hit.same_model, hit.entry_ids, hit.position_offsets, hit.layouts, hit.tiers,
                hit.grpc_address, (), [hit.locations[0], wrong, *hit.locations[2:]], hit.shm)
    bad = ArenaReader(client.arena(hit), TINY, lying)
    assert bad.read(Kind.V, 2, _flat(_layer_bytes(hit, Kind.V)), hit.num_chunks) == 1   # V2 of chunk 1
    assert bad.read(Kind.V, 1, _flat(_layer_bytes(hit, Kind.V)), hit.num_chunks) == 4


def test_verify_leading_counts_the_spans_before_the_first_bad_one(client: CacheClient, rng):
    """In parallel or alone, every span is checked in place and the count stops at the
    first whose bytes do not hash to its checksum."""
    fid = _register(client)
    hashes = client.hash_tokens(list(range(5 * 256)), fid)
    client.put(fid, "p", [make_entry(rng, TINY, h, 256) for h in hashes])
    hit = client.lookup(fid, hashes, locate=True).best()
    reader = ArenaReader(client.arena(hit), TINY, hit)
    spans = reader.spans(Kind.K, 0, TINY.num_layers, hit.num_chunks)
    assert len(spans) == 5 and reader.verify_leading(spans) == 5
    bad = dataclasses.replace(spans[2], checksums=(spans[2].checksums[0] ^ 1, *spans[2].checksums[1:]))
    assert reader.verify_leading([*spans[:2], bad, *spans[3:]]) == 2
    assert reader.verify_leading([bad]) == 0 and reader.verify_leading(spans[:1]) == 1
    assert reader.verify_leading([]) == 0


def test_the_copy_group_is_sized_from_the_l2_cache_sysfs_reports(tmp_path):
    """Copies are grouped by half a core's L2 (its source and copy both stay there while
    it is hashed): the size is read from sysfs's level-2 data or unified cache, in any of
    its units, and absent or unreadable it is None (the default applies)."""
    def cache(*indexes: tuple[str, str, str]):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for i, (level, kind, size) in enumerate(indexes):
            (root / f"index{i}").mkdir(parents=True)
            for name, text in (("level", level), ("type", kind), ("size", size)):
                (root / f"index{i}" / name).write_text(text + "\n")
        root.mkdir(exist_ok=True)
        return root
    assert local._l2_bytes(cache(("1", "Data", "48K"), ("1", "Instruction", "32K"), ("2", "Unified", "1024K"),
                                 ("3", "Unified", "32768K"))) == 1 << 20
    assert local._l2_bytes(cache(("2", "Instruction", "64K"), ("2", "Data", "2M"))) == 2 << 20
    assert local._l2_bytes(cache(("1", "Data", "48K"), ("3", "Unified", "32M"))) is None
    assert local._l2_bytes(cache(("2", "Unified", "lots"))) is None
    assert local._l2_bytes(tmp_path / "absent") is None
    assert local.GROUP_BYTES >= 64 << 10
