"""UCX data plane of a node: the socket protocol's requests and frames as tagged messages.

One thread owns the node's UCX worker. It takes requests (protocol.REQUEST_TAG, any
sender), answers on the tag each request names, and interleaves GETs: each GET is a
small task that posts its sends straight from the memory tier and yields while more
than SEND_WINDOW bytes are in flight, so a slow client does not hold up the others.
A WRITE receives its parts straight into the reserved memory; the thread waits for
them (bounded by ``io_timeout_s``), since the reservation's lock is held meanwhile.

Endpoints have no UCX error handling (see ucxlib), so a dead peer shows up as a
transfer that misses its deadline: a GET's entries are then released and a WRITE's
reservation aborted, after its receives are cancelled, so no late byte lands in
memory that is reused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from cachesvc.wire import ucxlib
from cachesvc.wire.protocol import (REQUEST_TAG, FrameType, Op, ProtocolError, pack_frame,
                                    unpack_ucx_request, unpack_ucx_write)
from cachesvc.node.dataplane.server import error_frame, open_read, run_batches
from cachesvc.wire.errors import CacheError
from cachesvc.node.logs import Throttled
from cachesvc.node.store import CacheStore

log = logging.getLogger(__name__)

SEND_WINDOW = 64 << 20
"""Bytes a GET may have in flight before it waits for the oldest send."""

Task = Generator[list[Any], None, None]
"""A request in progress: yields the UCX requests it waits for next."""


@dataclass
class _Running:
    task: Task
    address: bytes
    deadline: float
    waiting: list[Any] = field(default_factory=list)


class UcxNode:
    """The node's UCX worker and the thread that serves it."""

    def __init__(self, store: CacheStore, io_timeout_s: float = 30.0, tls: str = "",
                 net_devices: str = "") -> None:
        self.store = store
        self.io_timeout_s = io_timeout_s
        self._worker = ucxlib.Worker(tls, net_devices)
        self._stopping = threading.Event()
        self._grace_s = 0.0
        self._thread: threading.Thread | None = None
        self._running: list[_Running] = []
        self._answers: list[tuple[Any, bytes]] = []   # small sends kept alive until done
        self._malformed = Throttled(log)                # garbage must not flood the log

    def transports(self) -> dict[str, bytes]:
        """Descriptor entries: the worker address, and whether UCX found an RDMA device
        (clients on "auto" then prefer UCX to TCP)."""
        out = {"ucx": self._worker.address}
        if self._worker.rdma:
            out["ucx.rdma"] = b"1"
        return out

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dataplane-ucx", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Let transfers in flight finish for up to ``grace_s``, then cancel the rest
        (and wait for that: the memory tier they send from is closed next)."""
        self._grace_s = grace_s
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        stop_by = None
        try:
            while True:
                if self._stopping.is_set():
                    stop_by = stop_by or time.monotonic() + self._grace_s
                    if not self._running or time.monotonic() > stop_by:
                        break
                message = None if self._stopping.is_set() else self._worker.take(REQUEST_TAG)
                if message is not None:
                    self._handle(message)
                self._advance()
                self._answers = [(r, b) for r, b in self._answers if not r.completed]
                if message is None and not self._running and not self._answers:
                    self._worker.idle(0.05)
                else:
                    self._worker.progress()
        except Exception:   # the node must not die silently: log, and stop offering UCX
            log.exception("UCX data plane failed")
        finally:
            for running in self._running:
                running.task.close()
            self._worker.close()

    def _advance(self) -> None:
        """Step every task whose transfers completed; fail those past their deadline."""
        still: list[_Running] = []
        now = time.monotonic()
        for running in self._running:
            if not self._worker.done(running.waiting):
                if now > running.deadline:
                    log.info("UCX peer missed its deadline; dropping its transfer")
                    self._worker.forget(running.address)   # cancels its sends
                    running.task.close()                    # releases its entries
                    continue
                still.append(running)
                continue
            try:
                for r in running.waiting:
                    r.check_error()
                running.waiting = next(running.task)
                running.deadline = now + self.io_timeout_s
                still.append(running)
            except StopIteration:
                pass
            except Exception as exc:   # a UCX error on this peer: drop it alone
                log.info("UCX transfer failed", extra={"why": str(exc)})
                self._worker.forget(running.address)
                running.task.close()
        self._running = still

    def _handle(self, message: bytes) -> None:
        try:
            op, body, reply_tag, address = unpack_ucx_request(message)
        except ProtocolError as exc:
            self._malformed.info("dropped a malformed UCX request", why=str(exc))
            return
        ep = self._worker.endpoint(address)
        if op == Op.GET:
            task = self._get(ep, body, reply_tag)
            self._running.append(_Running(task, address, time.monotonic() + self.io_timeout_s,
                                          next(task)))
        elif op == Op.WRITE:
            self._write(ep, address, body, reply_tag)
        else:
            self._answer(ep, reply_tag, error_frame("UNIMPLEMENTED", f"{op.name} is not a UCX op"))

    def _answer(self, ep: Any, tag: int, frame: bytes) -> None:
        self._answers.append((self._worker.send(ep, frame, tag), frame))

    # ------------------------------------------------------------ requests

    def _get(self, ep: Any, body: bytes, tag: int) -> Task:
        """Frames, then each inline run's payload one message per layer."""
        try:
            runs, layer_major = open_read(self.store, body, "ucx")
        except CacheError as exc:
            frame = error_frame(exc.status, str(exc))
            yield [self._worker.send(ep, frame, tag)]
            return
        inflight: list[tuple[Any, int, Any]] = []   # (request, bytes, buffer kept alive)
        held = 0
        try:
            for batch in run_batches(runs, False, layer_major):
                frame = pack_frame(FrameType.RUNS, batch.header, batch.inline_bytes)
                inflight.append((self._worker.send(ep, frame, tag), 0, frame))
                for data, layers in zip(batch.inline, batch.layers, strict=True):
                    view = memoryview(data).cast("B")
                    step = len(view) // layers
                    for j in range(layers):
                        piece = view[j * step:(j + 1) * step]
                        inflight.append((self._worker.send(ep, piece, tag), step, piece))
                        held += step
                while held > SEND_WINDOW:
                    request, size, _ = inflight.pop(0)
                    yield [request]
                    held -= size
            end = pack_frame(FrameType.END)
            inflight.append((self._worker.send(ep, end, tag), 0, end))
            yield [r for r, _, _ in inflight]
        finally:
            runs.close()   # the sends are done (or cancelled): the entries may go

    def _write(self, ep: Any, address: bytes, body: bytes, tag: int) -> None:
        try:
            reservation_id, entry_index, offset, size, parts = unpack_ucx_write(body)
        except ProtocolError as exc:
            self._answer(ep, tag, error_frame("INVALID_ARGUMENT", str(exc)))
            return
        landed = False

        def fill(dest: memoryview) -> None:
            nonlocal landed
            requests, pos = [], 0
            for n in parts:
                requests.append(self._worker.recv(ep, dest[pos:pos + n], tag | 1))
                pos += n
            try:
                self._worker.wait(requests, self.io_timeout_s)
            except TimeoutError:
                self._worker.forget(address)   # cancel the receives before the memory is reused
                raise
            landed = True

        try:
            self.store.write_from(reservation_id, entry_index, offset, size, fill)
        except CacheError as exc:
            if not landed:
                self._drain(ep, address, parts, tag | 1)   # keep the peer's messages in step
            self._answer(ep, tag, error_frame(exc.status, str(exc)))
            return
        except Exception as exc:   # the writer died or stalled mid-payload: nothing may show
            log.info("UCX write failed; aborting its reservation", extra={"why": str(exc)})
            try:
                self.store.abort(reservation_id)
            except CacheError:
                pass
            return
        self._answer(ep, tag, pack_frame(FrameType.END))

    def _drain(self, ep: Any, address: bytes, parts: list[int], tag: int) -> None:
        """Receive and drop a refused payload (a peer's unmatched sends would otherwise
        stay queued here forever)."""
        scratch = [bytearray(n) for n in parts]
        try:
            self._worker.wait([self._worker.recv(ep, buf, tag) for buf in scratch], self.io_timeout_s)
        except TimeoutError:
            self._worker.forget(address)   # cancel before the scratch buffers go
