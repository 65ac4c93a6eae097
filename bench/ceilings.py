"""Transport ceilings measured in the benchmark's own run: what the hardware and the
kernel give before cachesvc adds anything."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time

import numpy as np

from cachesvc.dataplane.protocol import recv_into_exact


def memcpy_gbps(size_bytes: int, piece_bytes: int | None = None, repeats: int = 3) -> float:
    """Best of ``repeats`` copies of ``size_bytes`` between two warm buffers, whole or in
    ``piece_bytes`` pieces (slab-sized pieces are what a same-host reader copies)."""
    src = np.ones(size_bytes, np.uint8)
    dst = np.zeros(size_bytes, np.uint8)
    step = piece_bytes or size_bytes
    best = 0.0
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for i in range(0, size_bytes, step):
            np.copyto(dst[i:i + step], src[i:i + step])
        best = max(best, size_bytes / (time.perf_counter() - t0) / 1e9)
    return best


def _sender(family: int, address, size_bytes: int, repeats: int) -> None:
    payload = memoryview(np.ones(size_bytes, np.uint8))
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.connect(address)
        for _ in range(repeats):
            sock.sendall(payload)
            sock.recv(1)            # the receiver's ack paces the rounds


def socket_gbps(size_bytes: int, unix: bool = False, repeats: int = 3) -> float:
    """Best of ``repeats`` one-way streams of ``size_bytes`` from a child process
    (``sendall``) into a preallocated buffer here (``recv_into``): loopback TCP, or a Unix
    socket with ``unix``."""
    family = socket.AF_UNIX if unix else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind("\0cachesvc-ceiling-%d" % time.monotonic_ns() if unix else ("127.0.0.1", 0))
        listener.listen(1)
        ctx = mp.get_context("spawn")
        child = ctx.Process(target=_sender, args=(family, listener.getsockname(), size_bytes,
                                                  repeats + 1))
        child.start()
        conn, _ = listener.accept()
        buf = memoryview(np.empty(size_bytes, np.uint8))
        best = 0.0
        with conn:
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                recv_into_exact(conn, buf)
                best = max(best, size_bytes / (time.perf_counter() - t0) / 1e9)
                conn.sendall(b"k")
        child.join(30)
    return best
