"""Issue target: server RSS stays within the memory budget + 10% while clients write 10×
the budget. SmolLM2-135M-shaped entries (30 layers × K, V, E × 256 tokens, bf16)."""

from __future__ import annotations

import dataclasses
import threading
import time

import ml_dtypes
import numpy as np

from cachesvc_client import CacheClient, EntryData, Kind
from conftest import TINY

SMOL = dataclasses.replace(TINY, num_layers=30, num_kv_heads=3, head_dim=64, hidden_size=576,
                           tokenizer_fingerprint="smol-shape")
BUDGET = 1 << 30


def test_rss_within_budget_while_writing_ten_times_it(server_factory):
    srv = server_factory("--memory-bytes", str(BUDGET), "--disk-mode", "off")
    rng = np.random.default_rng(0)
    slabs = {(k, layer): rng.standard_normal(SMOL.slab_shape(k, 256), dtype=np.float32)
             .astype(ml_dtypes.bfloat16) for k in Kind for layer in range(30)}
    entry_bytes = sum(a.nbytes for a in slabs.values())
    n = 10 * BUDGET // entry_bytes + 1
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], srv.rss_bytes())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with CacheClient(srv.address) as client:
        reg = client.register_model("p", "0123abcd", SMOL)
        hashes = client.hash_tokens(list(range(256 * n)), reg.family_id)
        try:
            for i in range(0, n, 8):
                client.put(reg.family_id, "p", [EntryData(h, slabs) for h in hashes[i:i + 8]])
        finally:
            stop.set()
            watcher.join()
        stats = client.stats()
    written = n * entry_bytes
    print(f"wrote {written / 2**30:.1f} GiB; peak RSS {peak[0] / 2**20:.0f} MiB = "
          f"{peak[0] / BUDGET:.3f} × budget")
    assert written >= 10 * BUDGET
    assert stats["memory"]["evictions"] > 0.8 * n
    assert stats["memory"]["used_bytes"] <= BUDGET
    assert peak[0] <= 1.10 * BUDGET
