"""Per-tenant quotas: a tenant over its share of memory or disk evicts its own least
recently used entries, never another tenant's; an entry larger than the quota, or a quota
full of held entries, is RESOURCE_EXHAUSTED with the tenant named. Through the store and
through a real node (its quotas file)."""

from __future__ import annotations

import json

import pytest
import xxhash

from cachesvc.node.entries import SlabSpec
from cachesvc.node.records import Quota
from cachesvc.node.store import CacheStore, DiskMode, EntryInput, StoreConfig
from cachesvc.wire import errors
from cachesvc.wire.keys import Kind, chunk_hashes
from cachesvc_client import CacheClient, ClientOptions, ResourceExhaustedError
from conftest import TINY, make_entry

FID = TINY.family_id()
SLAB = TINY.slab_bytes(Kind.K, 256)
ENTRY = SLAB * TINY.num_layers            # K only, every layer (a multiple of the arena's alignment)


def put(store: CacheStore, tenant: str, chunk: bytes) -> None:
    payload = bytes([1]) * ENTRY
    slabs = [SlabSpec(Kind.K, layer, TINY.slab_shape(Kind.K, 256), TINY.dtype, xxhash.xxh3_64_intdigest(payload[:SLAB]))
             for layer in range(TINY.num_layers)]
    res = store.reserve(tenant, FID, "m", [EntryInput(chunk, 0, 256, slabs)])
    store.write(res.reservation_id, 0, 0, memoryview(payload))
    store.commit(res.reservation_id)


def held(store: CacheStore, tenant: str, tier: str) -> int:
    return store.usage_by_tenant().get((tenant, tier), 0)


def make(tmp_path, mode: DiskMode, **quotas) -> CacheStore:
    store = CacheStore(StoreConfig(memory_capacity_bytes=16 * ENTRY, disk_dir=tmp_path, disk_mode=mode,
                                   disk_capacity_bytes=64 * (ENTRY + 4096), quotas=quotas))
    for tenant in ("alpha", "beta", "tiny"):        # models are per tenant
        store.register_model("m", "aaaaaaaa", TINY, replace=False, tenant=tenant)
    return store


def test_a_tenant_over_its_memory_quota_evicts_its_own_entries_only(tmp_path):
    store = make(tmp_path, DiskMode.OFF, alpha=Quota(memory_bytes=3 * ENTRY), tiny=Quota(memory_bytes=ENTRY // 2))
    hashes = chunk_hashes(list(range(256 * 12)), FID)
    for h in hashes[:4]:
        put(store, "beta", h)                   # no quota of its own
    for h in hashes[4:]:
        put(store, "alpha", h)
        assert held(store, "alpha", "memory") <= 3 * ENTRY
    assert held(store, "alpha", "memory") == 3 * ENTRY and held(store, "beta", "memory") == 4 * ENTRY
    assert store.lookup("alpha", FID, hashes[-3:]).hits[0].metas.__len__() == 3     # the newest stayed
    assert store.lookup("beta", FID, hashes[:4]).hits[0].metas.__len__() == 4       # beta untouched
    with pytest.raises(errors.ResourceExhausted, match="over tenant 'tiny'.s memory quota"):
        put(store, "tiny", hashes[0])           # one entry is more than its whole quota
    lease, _ = store.pin("alpha", FID, [m.entry_id for m in store.lookup("alpha", FID, hashes[-3:]).hits[0].metas],
                         60)
    with pytest.raises(errors.ResourceExhausted, match="tenant 'alpha'.s memory quota .* is full"):
        put(store, "alpha", hashes[0])          # its quota is full of pinned entries
    store.unpin(lease)
    store.close()


def test_a_tenant_over_its_disk_quota_evicts_its_own_files_only(tmp_path):
    store = make(tmp_path, DiskMode.WRITE_THROUGH, alpha=Quota(disk_bytes=2 * (ENTRY + 4096)))
    hashes = chunk_hashes(list(range(256 * 10)), FID)
    for h in hashes[:3]:
        put(store, "beta", h)
    for h in hashes[3:]:
        put(store, "alpha", h)
    store.close()                                # drains the disk writer
    reopened = make(tmp_path, DiskMode.WRITE_THROUGH, alpha=Quota(disk_bytes=2 * (ENTRY + 4096)))
    assert 0 < held(reopened, "alpha", "disk") <= 2 * (ENTRY + 4096)
    assert held(reopened, "beta", "disk") >= 3 * ENTRY
    reopened.close()


def test_a_node_applies_its_quotas_file(server_factory, tmp_path, rng):
    path = tmp_path / "quotas.json"
    path.write_text(json.dumps({"alpha": {"memory_bytes": "256KiB"}, "tiny": {"memory_bytes": "16KiB"}}))
    node = server_factory("--memory-bytes", "16MiB", "--disk-mode", "off", "--tenant-quotas", str(path))
    with CacheClient(node.address, ClientOptions(tenant="alpha")) as alpha, \
            CacheClient(node.address, ClientOptions(tenant="beta")) as beta:
        reg = alpha.register_model("m", "abcdef01", TINY)
        beta.register_model("m", "abcdef01", TINY)         # models are per tenant
        hashes = alpha.hash_tokens(list(range(256 * 12)), reg.family_id)
        entries = [make_entry(rng, TINY, h, 256) for h in hashes]      # 96 KiB each
        beta.put(reg.family_id, "m", entries[:4])
        for entry in entries:
            alpha.put(reg.family_id, "m", [entry])
        assert 0 < sum(e.size_bytes for e in alpha.list_entries(tenant="alpha", limit=100)[0]) <= 256 << 10
        assert len(beta.list_entries(tenant="beta", limit=100)[0]) == 4
    with CacheClient(node.address, ClientOptions(tenant="tiny")) as tiny:
        tiny.register_model("m", "abcdef01", TINY)
        with pytest.raises(ResourceExhaustedError, match="over tenant 'tiny'"):
            tiny.put(reg.family_id, "m", entries[:1])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"alpha": {"memory": "1GiB"}}))
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "cachesvc.node.cli", "serve", "--port", "0", "--tenant-quotas",
                          str(bad), "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown keys ['memory']" in run.stderr
