"""The store's policies, in process: eviction, pins, read leases, expiry, tiers, capacity."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import xxhash

from cachesvc.wire import errors
from cachesvc.node.entries import SlabSpec
from cachesvc.wire.keys import Kind, chunk_hashes
from cachesvc.node.store import CacheStore, DiskMode, EntryInput, StoreConfig, Tier
from conftest import TINY

FID = TINY.family_id()
SLAB = TINY.slab_bytes(Kind.K, 256)
ENTRY_BYTES = SLAB * TINY.num_layers        # K only, all layers


def _store(tmp_path, memory_entries=4, mode=DiskMode.OFF, disk_entries=100, **kw) -> CacheStore:
    cfg = StoreConfig(memory_capacity_bytes=memory_entries * ENTRY_BYTES, disk_dir=tmp_path,
                      disk_mode=mode, disk_capacity_bytes=disk_entries * (ENTRY_BYTES + 4096), **kw)
    store = CacheStore(cfg)
    store.register_model("m", "aaaaaaaa", TINY, replace=False)
    return store


def _put(store: CacheStore, chunk: bytes, fill: int = 1, layers: int = TINY.num_layers) -> bytes:
    """Put one K-only entry whose bytes are all ``fill``; returns its payload."""
    payload = bytes([fill]) * SLAB * layers
    slabs = [SlabSpec(Kind.K, layer, TINY.slab_shape(Kind.K, 256), TINY.dtype,
                      xxhash.xxh3_64_intdigest(payload[:SLAB])) for layer in range(layers)]
    res = store.reserve("", FID, "m", [EntryInput(chunk, 0, 256, slabs)])
    if not res.already_present[0]:
        store.write(res.reservation_id, 0, 0, memoryview(payload))
        store.commit(res.reservation_id)
    return payload


def _hashes(n: int) -> list[bytes]:
    return chunk_hashes(list(range(256 * n)), FID)


def _read_all(store: CacheStore, entry_ids) -> list:
    """Runs with their data copied while the store still holds the entry."""
    with store.read("", FID, entry_ids, [Kind.K], 0, 0) as runs:
        return [dataclasses.replace(r, data=bytes(r.data)) for r in runs]


def test_lru_eviction_keeps_recently_read(tmp_path):
    store = _store(tmp_path, memory_entries=3)
    hs = _hashes(4)
    for h in hs[:3]:
        _put(store, h)
    first = store.lookup("", FID, hs[:1]).hits[0].metas[0].entry_id
    _read_all(store, [first])                     # chunk 0 becomes most recent
    _put(store, hs[3])                            # evicts chunk 1, the least recent
    present = [bool(store.lookup("", FID, [h]).hits) for h in hs]
    assert present == [True, False, True, True]
    assert store.stats()["memory"]["evictions"] == 1


def test_a_put_of_an_entry_already_held_counts_as_a_use(tmp_path):
    """A writer that puts what the node already holds (a producer storing a context
    again) keeps it, as a reader would: the least recently used other entry goes first."""
    store = _store(tmp_path, memory_entries=3)
    hs = _hashes(4)
    for h in hs[:3]:
        _put(store, h)
    _put(store, hs[0])                            # already present: nothing written, but used
    _put(store, hs[3])                            # evicts chunk 1, not chunk 0
    present = [bool(store.lookup("", FID, [h]).hits) for h in hs]
    assert present == [True, False, True, True]


def test_pinned_and_leased_entries_survive(tmp_path):
    store = _store(tmp_path, memory_entries=2)
    hs = _hashes(4)
    _put(store, hs[0])
    _put(store, hs[1])
    res = store.lookup("", FID, hs[:2], lease_ttl_s=60)
    assert res.lease_id
    with pytest.raises(errors.ResourceExhausted, match="pinned"):
        _put(store, hs[2])                        # both pinned: no victim
    store.unpin(res.lease_id)
    _put(store, hs[2])                            # now one can go
    with pytest.raises(errors.NotFound):
        store.unpin(res.lease_id)


def test_entry_being_read_is_not_freed(tmp_path):
    store = _store(tmp_path, memory_entries=1)
    hs = _hashes(2)
    payload = _put(store, hs[0], fill=7)
    eid = store.lookup("", FID, hs[:1]).hits[0].metas[0].entry_id
    reader = store.read("", FID, [eid], [Kind.K], 0, 0)   # read lease taken here
    with pytest.raises(errors.ResourceExhausted):
        _put(store, hs[1], fill=9)                          # cannot evict the one being read
    store.delete("", FID, [eid], [])                       # deleted while read...
    data = b"".join(bytes(run.data) for run in reader)      # ...still reads its own bytes
    assert data == payload
    with pytest.raises(errors.ResourceExhausted):
        _put(store, hs[1], fill=9)                          # read to the end: still held
    reader.close()
    _put(store, hs[1], fill=9)                              # freed once the reader closes
    assert store.stats()["entries"] == 1


def test_reservation_expiry_returns_memory(tmp_path):
    store = _store(tmp_path, memory_entries=2, reservation_ttl_s=0.2)
    store.start()
    try:
        slabs = [SlabSpec(Kind.K, 0, TINY.slab_shape(Kind.K, 256), TINY.dtype, 0)]
        res = store.reserve("", FID, "m", [EntryInput(_hashes(1)[0], 0, 256, slabs)])
        assert store.stats()["memory"]["reserved_bytes"] > 0
        deadline = time.monotonic() + 5
        while store.stats()["open_reservations"] and time.monotonic() < deadline:
            time.sleep(0.05)
        s = store.stats()
        assert s["open_reservations"] == 0 and s["memory"]["reserved_bytes"] == 0
        assert s["counters"]["reservations_expired"] == 1
        with pytest.raises(errors.NotFound, match="expired"):
            store.commit(res.reservation_id)
    finally:
        store.close()


def test_spill_mode_moves_evicted_entries_to_disk(tmp_path):
    store = _store(tmp_path, memory_entries=2, mode=DiskMode.SPILL)
    hs = _hashes(5)
    payloads = [_put(store, h, fill=i + 1) for i, h in enumerate(hs)]
    hit = store.lookup("", FID, hs).hits[0]
    assert len(hit.metas) == 5
    assert hit.tiers.count(Tier.MEMORY) == 2
    runs = _read_all(store, [m.entry_id for m in hit.metas])
    got = {}
    for run in runs:
        got.setdefault(run.entry_index, b"")
        got[run.entry_index] += run.data
    assert [got[i] for i in range(5)] == payloads
    store.close()


def test_disk_capacity_evicts_oldest_files(tmp_path):
    store = _store(tmp_path, memory_entries=1, mode=DiskMode.SPILL, disk_entries=2)
    hs = _hashes(5)
    for h in hs:
        _put(store, h)
    s = store.stats()
    assert s["disk"]["used_bytes"] <= s["disk"]["capacity_bytes"]
    assert s["entries"] == 3                      # 1 in memory + 2 on disk
    assert len(list((tmp_path / "entries").glob("*/*.ent"))) == 2
    store.close()


def test_corrupt_disk_slab_is_a_miss_and_dropped(tmp_path):
    store = _store(tmp_path, memory_entries=1, mode=DiskMode.SPILL)
    hs = _hashes(2)
    _put(store, hs[0])
    _put(store, hs[1])                            # chunk 0 spilled to disk
    hit = store.lookup("", FID, hs[:1]).hits[0]
    meta = hit.metas[0]
    assert hit.tiers[0] == Tier.DISK
    path = store._disk.path(meta.entry_id)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                    # rot one payload byte
    path.write_bytes(bytes(raw))
    runs = _read_all(store, [meta.entry_id])
    assert runs and all(r.missing_reason and not r.data for r in runs)
    assert store.stats()["counters"]["checksum_failures"] == 1
    assert not store.lookup("", FID, hs[:1]).hits   # dropped from the index
    store.close()


def test_capacity_never_exceeded_under_concurrent_writers(tmp_path):
    store = _store(tmp_path, memory_entries=6)
    hs = _hashes(200)
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            s = store.stats()["memory"]
            peak[0] = max(peak[0], s["used_bytes"] + s["reserved_bytes"])

    def writer(k):
        for h in hs[k::4]:
            try:
                _put(store, h)
            except errors.ResourceExhausted:
                pass   # every entry momentarily held: acceptable, never over capacity

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert 0 < peak[0] <= store.config.memory_capacity_bytes
    assert store.stats()["counters"]["mem_evictions"] >= 150


def test_replace_model_drops_its_entries(tmp_path):
    store = _store(tmp_path)
    _put(store, _hashes(1)[0])
    with pytest.raises(errors.FailedPrecondition, match="replace"):
        store.register_model("m", "bbbbbbbb", TINY, replace=False)
    store.register_model("m", "bbbbbbbb", TINY, replace=True)
    assert store.stats()["entries"] == 0


def test_reads_report_layers_never_stored(tmp_path):
    store = _store(tmp_path)
    h = _hashes(1)[0]
    _put(store, h)
    eid = store.lookup("", FID, [h]).hits[0].metas[0].entry_id
    with store.read("", FID, [eid], [Kind.K, Kind.E], 1, 3) as handle:
        runs = [dataclasses.replace(r, data=b"") for r in handle]
    k_runs = [r for r in runs if r.kind == Kind.K]
    e_runs = [r for r in runs if r.kind == Kind.E]
    assert [(r.layer_start, r.num_layers, bool(r.missing_reason)) for r in k_runs] == [(1, 2, False)]
    assert [(r.layer_start, r.num_layers) for r in e_runs] == [(1, 2)] and e_runs[0].missing_reason


def test_partial_prefix_and_producer_filter(tmp_path):
    store = _store(tmp_path, memory_entries=10)
    store.register_model("m2", "cccccccc", TINY, replace=False)
    hs = _hashes(4)
    for h in hs[:3]:
        _put(store, h)
    res = store.lookup("", FID, hs, consumer="m")
    assert [(h.producer, len(h.metas), h.same_model) for h in res.hits] == [("m", 3, True)]
    assert store.lookup("", FID, hs, producers=["m2"]).hits == []
    other = chunk_hashes([7] + list(range(1, 256 * 4)), FID)   # first token differs
    assert store.lookup("", FID, other).hits == []              # so every chained hash does
    assert store.lookup("other-tenant", FID, hs).hits == []
    np.testing.assert_equal(store.stats()["counters"]["hit_chunks"], 3)


@pytest.mark.parametrize("holder", ["reader", "lease"])
def test_replacing_an_entry_someone_holds(tmp_path, holder):
    """A re-put with other slabs replaces the entry; whoever held the old one keeps its
    bytes; letting go frees exactly the old one and never touches the new one."""
    store = _store(tmp_path, memory_entries=3, mode=DiskMode.SPILL)
    hs = _hashes(4)
    old_payload = _put(store, hs[0], fill=1, layers=2)
    eid = store.lookup("", FID, hs[:1]).hits[0].metas[0].entry_id
    if holder == "reader":
        reader = store.read("", FID, [eid], [Kind.K], 0, 0)
    else:
        lease_id = store.lookup("", FID, hs[:1], lease_ttl_s=60).lease_id
    new_payload = _put(store, hs[0], fill=2, layers=4)          # same key, more layers
    if holder == "reader":
        assert b"".join(bytes(r.data) for r in reader) == old_payload   # old bytes to the end
        reader.close()
    else:
        store.unpin(lease_id)
    s = store.stats()
    assert (s["entries"], s["memory"]["entries"]) == (1, 1)      # the new one, in the LRU
    assert s["memory"]["used_bytes"] == len(new_payload)        # the old one is freed
    hit = store.lookup("", FID, hs[:1]).hits[0]
    assert hit.metas[0].layout.k_layers == (0, 1, 2, 3)
    assert b"".join(r.data for r in _read_all(store, [eid])) == new_payload
    for h in hs[1:]:                                             # it spills and reads back
        _put(store, h)
    hit = store.lookup("", FID, hs[:1]).hits[0]
    assert hit.tiers[0] == Tier.DISK
    assert b"".join(r.data for r in _read_all(store, [eid])) == new_payload
    store.close()


def test_reservation_ttl_is_bounded(tmp_path):
    store = _store(tmp_path)
    slabs = [SlabSpec(Kind.K, 0, TINY.slab_shape(Kind.K, 256), TINY.dtype, 0)]
    with pytest.raises(errors.InvalidArgument, match="ttl"):
        store.reserve("", FID, "m", [EntryInput(_hashes(1)[0], 0, 256, slabs)], ttl_s=10**6)
    assert store.stats()["memory"]["reserved_bytes"] == 0


def test_a_put_whose_producer_is_replaced_before_commit_is_aborted(tmp_path):
    """Entries computed with weights the producer no longer has never become visible:
    a reserve naming other weights is refused, and a replace between reserve and commit
    aborts the put (a copy between nodes racing a model replace hit this)."""
    store = _store(tmp_path)
    h = _hashes(1)[0]
    payload = bytes([3]) * SLAB * TINY.num_layers
    slabs = [SlabSpec(Kind.K, layer, TINY.slab_shape(Kind.K, 256), TINY.dtype, xxhash.xxh3_64_intdigest(payload[:SLAB]))
             for layer in range(TINY.num_layers)]
    with pytest.raises(errors.FailedPrecondition, match="registered with weights aaaaaaaa"):
        store.reserve("", FID, "m", [EntryInput(h, 0, 256, slabs)], producer_digest="bbbbbbbb")
    res = store.reserve("", FID, "m", [EntryInput(h, 0, 256, slabs)], producer_digest="AAAAAAAA")
    store.write(res.reservation_id, 0, 0, memoryview(payload))
    store.register_model("m", "cccccccc", TINY, replace=True)
    with pytest.raises(errors.FailedPrecondition, match="other weights since this reservation"):
        store.commit(res.reservation_id)
    assert store.lookup("", FID, [h]).hits == []
    assert store.stats()["memory"]["used_bytes"] == 0 and store.stats()["open_reservations"] == 0
    store.close()
