"""Entry file format: whole files reload, torn or foreign files are dropped."""

import numpy as np
import xxhash

from cachesvc.node.disk import DiskTier
from cachesvc.node.entries import SlabSpec, plan_entry
from cachesvc.wire.keys import Kind
from conftest import TINY


def _meta(chunk: bytes, payload: bytes):
    fam = TINY
    slabs, pos = [], 0
    for layer in range(fam.num_layers):
        size = fam.slab_bytes(Kind.K, 256)
        slabs.append(SlabSpec(Kind.K, layer, fam.slab_shape(Kind.K, 256), fam.dtype,
                              xxhash.xxh3_64_intdigest(payload[pos:pos + size])))
        pos += size
    return plan_entry(0, "default", fam.family_id(), fam, "m", chunk, 0, 256, slabs, 256)


def test_write_scan_read_and_torn(tmp_path):
    disk = DiskTier(tmp_path)
    rng = np.random.default_rng(1)
    metas = []
    for i in range(4):
        payload = rng.bytes(TINY.slab_bytes(Kind.K, 256) * TINY.num_layers)
        meta = _meta(bytes([i]) * 32, payload)
        disk.write(meta, memoryview(payload))
        metas.append((meta, payload))
    # tear one file (cut its tail), corrupt another's header, leave a stray tmp
    p1 = disk.path(metas[1][0].entry_id)
    p1.write_bytes(p1.read_bytes()[:-100])
    p2 = disk.path(metas[2][0].entry_id)
    raw = bytearray(p2.read_bytes())
    raw[20] ^= 0xFF
    p2.write_bytes(bytes(raw))
    (p1.parent / "junk.tmp").write_bytes(b"x")
    scan = disk.scan()
    kept = {m.entry_id for m in scan.entries}
    assert kept == {metas[0][0].entry_id, metas[3][0].entry_id}
    assert len(scan.dropped) == 2 and not p1.exists() and not p2.exists()
    meta, payload = metas[3]
    assert disk.read(meta, 100, 50) == payload[100:150]
    assert disk.file_bytes(meta) == disk.path(meta.entry_id).stat().st_size


def test_renamed_file_is_dropped(tmp_path):
    disk = DiskTier(tmp_path)
    payload = bytes(TINY.slab_bytes(Kind.K, 256) * TINY.num_layers)
    meta = _meta(b"\x01" * 32, payload)
    disk.write(meta, memoryview(payload))
    path = disk.path(meta.entry_id)
    path.rename(path.with_name("00" * 16 + ".ent"))
    assert disk.scan().entries == []
