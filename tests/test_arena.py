import random

import pytest

from cachesvc.node.arena import ALIGN_BYTES, Arena


def test_alloc_free_coalesce():
    arena = Arena(16 * ALIGN_BYTES)
    a, b, c = (arena.alloc(ALIGN_BYTES * 4) for _ in range(3))
    assert (a, b, c) == (0, 4 * ALIGN_BYTES, 8 * ALIGN_BYTES)
    assert arena.alloc(ALIGN_BYTES * 5) is None                 # only 4 blocks left
    arena.free(b)
    assert arena.alloc(ALIGN_BYTES * 5) is None                 # two holes of 4, not contiguous
    arena.free(a)
    assert arena.stats().largest_free_bytes == 8 * ALIGN_BYTES  # a and b merged
    assert arena.alloc(ALIGN_BYTES * 8) == 0
    arena.free(0)
    arena.free(c)
    s = arena.stats()
    assert (s.used_bytes, s.free_extents, s.largest_free_bytes) == (0, 1, 16 * ALIGN_BYTES)


def test_never_exceeds_capacity_under_random_churn():
    rnd = random.Random(7)
    arena = Arena(1 << 20)
    live: dict[int, int] = {}
    for _ in range(5000):
        if live and rnd.random() < 0.45:
            off = rnd.choice(list(live))
            arena.free(off)
            del live[off]
        else:
            size = rnd.randint(1, 64 << 10)
            off = arena.alloc(size)
            if off is not None:
                assert off + size <= arena.capacity_bytes
                for other, osize in live.items():     # no overlap with any live extent
                    assert off + size <= other or other + osize <= off
                live[off] = arena.extent_bytes(off)
        assert arena.used_bytes == sum(live.values()) <= arena.capacity_bytes
    for off in list(live):
        arena.free(off)
    assert arena.stats().free_extents == 1


def test_bytes_round_trip():
    arena = Arena(1 << 16)
    off = arena.alloc(10)
    arena.view[off:off + 10] = b"0123456789"
    assert bytes(arena.view[off:off + 10]) == b"0123456789"


def test_too_small():
    with pytest.raises(ValueError):
        Arena(10)


def _rss_shmem_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise RuntimeError("no RssShmem")


def test_prefault_maps_the_whole_arena():
    before = _rss_shmem_kib()
    arena = Arena(64 << 20, prefault=True)
    grown = _rss_shmem_kib() - before
    lazy = Arena(64 << 20)
    lazy_grown = _rss_shmem_kib() - before - grown
    assert grown >= 63 * 1024 and lazy_grown < 1024
    arena.close()
    lazy.close()
