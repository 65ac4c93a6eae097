"""Transport ceilings measured in the benchmark's own run: what the hardware and the
kernel give before cachesvc adds anything."""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable

import numpy as np

from cachesvc.wire.protocol import recv_into_exact
from cachesvc_client.local import copy_rows


class CopyPasses:
    """One copy of ``size_bytes`` between two warm buffers, whole or in ``piece_bytes``
    pieces (slab-sized pieces are what a same-host reader copies), per call of a pass.
    The source is anonymous memory (numpy asks for huge pages for it), or with
    ``from_memfd`` a shared memfd mapping like the node's memory tier, whose pages are
    huge only where the kernel allows it for shmem (transparent_hugepage/shmem_enabled).
    Two passes: memmove (``np.copyto``) and numpy's vectorized loop, which readers of
    the memory tier use (``local.copy_rows``); on some hosts one wins, on others the
    other, and the ceiling is the better. Buffers live as long as the object."""

    def __init__(self, size_bytes: int, piece_bytes: int | None = None, from_memfd: bool = False) -> None:
        self.size_bytes, self._step = size_bytes, piece_bytes or size_bytes
        if from_memfd:
            fd = os.memfd_create("cachesvc-ceiling", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size_bytes)
                mapping = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
            with contextlib.suppress(AttributeError, OSError):
                mapping.madvise(mmap.MADV_HUGEPAGE)   # as the arena does
            self._src = np.frombuffer(mapping, np.uint8)   # holds the mapping
            self._src[:] = 1
        else:
            self._src = np.ones(size_bytes, np.uint8)
        self._dst = np.zeros(size_bytes, np.uint8)

    def passes(self) -> dict[str, Callable[[], None]]:
        return {"memmove": lambda: self._pass(np.copyto), "vector loop": lambda: self._pass(copy_rows)}

    def _pass(self, copy) -> None:
        src, dst, step = self._src, self._dst, self._step
        for i in range(0, self.size_bytes, step):
            copy(dst[i:i + step], src[i:i + step])


def interleaved_best(timed: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Each callable's best time in seconds over ``repeats + 1`` rounds (the first warms
    up, and counts where it is the best), the callables taking turns within a round: this VM's speed moves by a third
    from one second to the next, so a ceiling measured apart from what it bounds can sit
    on either side of it (a GET measured at 1.21x its ceiling, 2026-12-07)."""
    best = dict.fromkeys(timed, float("inf"))
    for _ in range(repeats + 1):
        for name, fn in timed.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def memcpy_gbps(size_bytes: int, piece_bytes: int | None = None, repeats: int = 3,
                from_memfd: bool = False) -> float:
    """The best rate of :class:`CopyPasses` (either kind of pass) over ``repeats``
    rounds."""
    passes = CopyPasses(size_bytes, piece_bytes, from_memfd).passes()
    return size_bytes / min(interleaved_best(passes, repeats).values()) / 1e9


def load_ceiling_gbps(size_bytes: int, device: str, piece_bytes: int | None = None, repeats: int = 3) -> float:
    """What loading ``size_bytes`` of slabs into a consumer can reach at best: on a CPU,
    memcpy in slab-sized pieces; on a GPU, the pinned host-to-device copy (best of
    ``repeats``)."""
    if not device.startswith("cuda"):
        return memcpy_gbps(size_bytes, piece_bytes, repeats)
    import torch   # the benchmarks that pass a CUDA device have torch
    src = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(repeats + 1):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = max(best, size_bytes / (time.perf_counter() - t0) / 1e9)
    return best


class LoadCeiling:
    """:func:`load_ceiling_gbps` sampled right after each load it bounds (``observe``,
    one round per load), best per size: on this VM the copy rate moves by a third from
    one second to the next, and a ceiling measured minutes apart from the loads can sit
    on either side of them."""

    def __init__(self, device: str, piece_bytes: int) -> None:
        self.device, self.piece_bytes = device, piece_bytes
        self._best: dict[int, float] = {}

    def observe(self, size_bytes: int) -> None:
        # On a GPU once per size: a pinned buffer of a long context's K/V takes ~1 s to
        # allocate, and a GPU's copy rate does not wander as this VM's does.
        if size_bytes and not (self.device.startswith("cuda") and size_bytes in self._best):
            rate = load_ceiling_gbps(size_bytes, self.device, self.piece_bytes,
                                     repeats=3 if self.device.startswith("cuda") else 1)
            self._best[size_bytes] = max(rate, self._best.get(size_bytes, 0.0))

    def gbps(self, size_bytes: int) -> float | None:
        """The best sample for loads of ``size_bytes`` (measured now where none was)."""
        if not size_bytes:
            return None
        return round(self._best.get(size_bytes) or load_ceiling_gbps(size_bytes, self.device, self.piece_bytes), 3)


def _sender(family: int, address, size_bytes: int, repeats: int) -> None:
    payload = memoryview(np.ones(size_bytes, np.uint8))
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.connect(address)
        for _ in range(repeats):
            sock.sendall(payload)
            sock.recv(1)            # the receiver's ack paces the rounds


def socket_gbps(size_bytes: int, unix: bool = False, repeats: int = 10) -> float:
    """Best of ``repeats`` one-way streams of ``size_bytes`` from a child process
    (``sendall``) into a preallocated, prefaulted buffer here (``recv_into``): loopback
    TCP, or a Unix socket with ``unix``. Ten rounds, not three: a 4 MiB Unix-socket ceiling
    of three once came out at 0.45 GB/s against 7-14 in every other sample (2026-12-08)."""
    family = socket.AF_UNIX if unix else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind("\0cachesvc-ceiling-%d" % time.monotonic_ns() if unix else ("127.0.0.1", 0))
        listener.listen(1)
        ctx = mp.get_context("spawn")
        child = ctx.Process(target=_sender, args=(family, listener.getsockname(), size_bytes,
                                                  repeats + 1))
        child.start()
        conn, _ = listener.accept()
        buf = memoryview(np.ones(size_bytes, np.uint8))   # every page faulted in now
        best = 0.0
        with conn:
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                recv_into_exact(conn, buf)
                best = max(best, size_bytes / (time.perf_counter() - t0) / 1e9)
                conn.sendall(b"k")
        child.join(30)
    return best



def _ucx_sender(conn, tls: str, net_devices: str, size_bytes: int, piece_bytes: int,
                repeats: int, shared: bool) -> None:
    from cachesvc.wire.ucxlib import Worker
    worker = Worker(tls, net_devices)
    conn.send(worker.address)
    ep = worker.endpoint(conn.recv())
    if shared:   # like the node's memory tier: a memfd mapping
        fd = os.memfd_create("ceiling")
        os.ftruncate(fd, size_bytes)
        payload = memoryview(mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED))
        payload[:] = b"\1" * size_bytes
    else:        # numpy's own buffer: large ones get transparent huge pages
        payload = memoryview(np.ones(size_bytes, np.uint8))
    for _ in range(repeats):
        worker.take_within(2, 30)                    # the receiver has posted its receives
        worker.wait([worker.send(ep, payload[i:i + piece_bytes], 1)
                     for i in range(0, size_bytes, piece_bytes)], 30)
    worker.close()


def ucx_gbps(size_bytes: int, piece_bytes: int, repeats: int = 3, tls: str = "",
             sender_net_devices: str = "lo", shared: bool = True) -> float:
    """Best of ``repeats`` one-way transfers of ``size_bytes`` as ``piece_bytes`` tagged
    messages from a child process into a preallocated buffer here, over ucxx with the
    settings cachesvc uses (worker-address endpoints, the sender on ``lo`` like a test
    node, this side on UCX's own choice of devices).

    ``shared``: send from a memfd mapping, as the node does. This matters on one host:
    UCX then reads the sender's memory with CMA, which is ~5x faster from transparent
    huge pages, and hosts that give them to anonymous memory often do not give them to
    shared memory (``/sys/kernel/mm/transparent_hugepage/shmem_enabled``)."""
    from cachesvc.wire.ucxlib import Worker
    worker = Worker(tls, "")
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_ucx_sender, args=(there, tls, sender_net_devices, size_bytes,
                                                  piece_bytes, repeats + 1, shared))
    child.start()
    ep = worker.endpoint(here.recv())
    here.send(worker.address)
    buf = memoryview(np.empty(size_bytes, np.uint8))
    best = 0.0
    for _ in range(repeats + 1):
        receives = [worker.recv(ep, buf[i:i + piece_bytes], 1)
                    for i in range(0, size_bytes, piece_bytes)]
        t0 = time.perf_counter()
        worker.wait([worker.send(ep, b"g", 2)], 30)
        worker.wait(receives, 30)
        best = max(best, size_bytes / (time.perf_counter() - t0) / 1e9)
    child.join(30)
    worker.close()
    return best


def ucx_version() -> str:
    from importlib.metadata import version
    return version("ucxx-cu12")
