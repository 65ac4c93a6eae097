"""Client side of the socket data plane (protocol: cachesvc.wire.protocol).

``SocketTransport`` fetches over TCP, receiving each slab straight into its place in the
caller's buffer (``recv_into``, no intermediate copy). ``ShmTransport`` is for a node on
the same host: it maps the node's memory tier once (the arena's memfd, passed over a
Unix socket) and copies each slab out with one memcpy, holding the entries only until it
has; with ``copy_threads`` > 1 the copies and checksums of a frame's slabs run in a pool
(both release the GIL, so a consumer computing in another thread keeps going). Both
verify every slab's checksum; a mismatch is a miss.

A fetch is a generator that yields after every run, so a caller can consume layers as
they complete. Connections are pooled per transport and reused; one that failed is
closed, never reused.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Protocol


from cachesvc.wire import ucxlib
from cachesvc.wire.protocol import (FRAME, Frame, FrameType, Op, discard, host_id, pack_request,
                                    pack_write, read_frame, recv_exact, recv_into_exact, send_parts,
                                    unpack_runs)
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc_client.codec import PutPlan, SlabAssembler
from cachesvc_client.errors import CacheServiceError, UnavailableError, error_for_status
from cachesvc_client.local import copy_and_digest, map_pages
from cachesvc_client.options import ClientOptions


class Transport(Protocol):
    """A data-plane path to one node (sockets here, UCX in cachesvc_client.ucx)."""

    name: str

    def probe(self) -> None: ...
    def close(self) -> None: ...
    def fetch(self, request: pb.GetSlabsRequest, asm: SlabAssembler) -> Iterator[None]: ...
    def write(self, reservation_id: str, plan: PutPlan,
              targets: Sequence[pb.EntryWriteTarget]) -> None: ...

WRITE_WINDOW = 16
"""WRITE requests in flight per connection before waiting for an answer."""


class SocketTransport:
    """Pooled connections to one node's data plane over TCP (``"host:port"``) or, for
    :class:`ShmTransport`, its abstract Unix socket."""

    name = "tcp"

    def __init__(self, address: str, io_timeout_s: float = 30.0, tls: ssl.SSLContext | None = None,
                 server_name: str = "", token: str = "") -> None:
        self.address = address
        self.token = token     # sent as each connection's first request (a node with API tokens)
        self.io_timeout_s = io_timeout_s
        self.tls, self.server_name = tls, server_name   # TLS over TCP (a node with --tls-cert)
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        host, port = self.address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=self.io_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_name or host)
            self._authenticate(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _authenticate(self, sock: socket.socket) -> None:
        """Present the token (before anything else on the connection); the node's typed
        error (UnauthenticatedError) when it refuses it."""
        if not self.token:
            return
        sock.sendall(pack_request(Op.AUTH, self.token.encode()))
        frame = read_frame(sock)
        if frame.type != FrameType.END:
            raise frame_error(frame) if frame.type == FrameType.ERROR else \
                ConnectionError(f"unexpected {frame.type.name} frame answering AUTH")

    def _take(self) -> socket.socket:
        """A pooled connection that is still open, or a new one."""
        while True:
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                break
            if _still_open(sock):
                return sock
            sock.close()   # the node closed it while idle (e.g. it restarted)
        try:
            return self._connect()
        except OSError as exc:
            raise UnavailableError(f"data plane {self.name} {self.address!r} unreachable: {exc}") from None

    @contextlib.contextmanager
    def _connection(self, doing: str) -> Iterator[socket.socket]:
        """A connection for one request: back to the pool if the request completed,
        closed otherwise (its state is unknown); socket failures become UnavailableError."""
        sock = self._take()
        ok = False
        try:
            yield sock
            ok = True
        except (ConnectionError, OSError) as exc:
            raise UnavailableError(f"data plane {self.name} {self.address!r} failed {doing}: "
                                   f"{exc or type(exc).__name__}") from None
        finally:
            if ok:
                self._give_back(sock)
            else:
                sock.close()

    def _give_back(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle.append(sock)

    def probe(self) -> None:
        """Connect once (and keep the connection pooled); UnavailableError if we cannot."""
        self._give_back(self._take())

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def fetch(self, request: pb.GetSlabsRequest, asm: SlabAssembler) -> Iterator[None]:
        """Run one GetSlabs request into ``asm``; yields after every frame."""
        with self._connection("mid-transfer") as sock:
            sock.sendall(pack_request(self._op(), request.SerializeToString()))
            yield from self._receive(sock, asm)

    def write(self, reservation_id: str, plan: PutPlan, targets: Sequence[pb.EntryWriteTarget]) -> None:
        """Send the payload of every target entry (one WRITE each), straight into the
        node's reserved memory. Pipelined with at most WRITE_WINDOW answers outstanding:
        unbounded pipelining deadlocks once the answers fill the socket buffers."""
        failures: list[CacheServiceError] = []
        with self._connection("mid-write") as sock:
            outstanding = 0
            for target in targets:
                if outstanding >= WRITE_WINDOW:
                    failures += answer_error(read_frame(sock))
                    outstanding -= 1
                # The header and every slab of the entry in one scatter-gather send: a
                # sendall per slab cost 480 syscalls for SmolLM2's 2048 tokens of K+V.
                send_parts(sock, [pack_write(reservation_id, target.entry_index, 0, target.size_bytes),
                                  *plan.payloads[target.entry_index]])
                outstanding += 1
            for _ in range(outstanding):
                failures += answer_error(read_frame(sock))
        if failures:
            raise failures[0]

    def _op(self) -> Op:
        return Op.GET

    def _receive(self, sock: socket.socket, asm: SlabAssembler) -> Iterator[None]:
        pending: list[tuple[pb.SlabRun, list[memoryview], Future]] = []   # arena copies in flight
        try:
            while True:
                frame = read_frame(sock)
                if frame.type == FrameType.END:
                    return
                if frame.type == FrameType.ERROR:
                    raise frame_error(frame)
                if frame.type != FrameType.RUNS:
                    raise ConnectionError(f"unexpected {frame.type.name} frame")
                inline_left = frame.payload_bytes
                for ref in unpack_runs(frame.header):
                    run = pb.SlabRun.FromString(ref.header)
                    if run.missing:
                        asm.miss(run)
                    elif ref.arena_offset >= 0:
                        self._copy_from_arena(run, ref.arena_offset, ref.size, asm, pending)
                    else:
                        self._recv_run(sock, run, ref.size, asm)
                        inline_left -= ref.size
                if inline_left:
                    raise ConnectionError(f"RUNS frame payload off by {inline_left} bytes")
                for run, regions, copied in pending:   # in order: layers complete in order
                    asm.accept(run, regions, copied.result())
                pending.clear()
                yield
        finally:
            # Never leave a copy running into the caller's memory, nor out of entries the
            # node may free once this connection is gone.
            wait([copied for _, _, copied in pending])

    def _recv_run(self, sock: socket.socket, run: pb.SlabRun, size: int, asm: SlabAssembler) -> None:
        regions = asm.fit(run, size)
        if regions is None:
            discard(sock, size)   # keep the stream in step
            return
        for region in regions:
            recv_into_exact(sock, region)
        asm.accept(run, regions)

    def _copy_from_arena(self, run: pb.SlabRun, offset: int, size: int, asm: SlabAssembler,
                         pending: list) -> None:
        raise ConnectionError("node sent an arena offset over a connection without shm")


class ShmTransport(SocketTransport):
    """Same-host: copy slabs out of the node's memory tier, mapped read-only."""

    name = "shm"

    def __init__(self, unix_name: bytes, io_timeout_s: float = 30.0, copy_threads: int = 0, token: str = "") -> None:
        super().__init__(unix_name.decode(), io_timeout_s, token=token)
        self._arena: mmap.mmap | None = None
        self._tier_fd = -1   # the tier's file, kept to ask which pages the node has allocated
        self._map_lock = threading.Lock()
        self._copiers = ThreadPoolExecutor(copy_threads, thread_name_prefix="shm-copy") \
            if copy_threads > 1 else None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.io_timeout_s)
        try:
            sock.connect(self.address)
            self._authenticate(sock)
            with self._map_lock:
                if self._arena is None:
                    self._arena, self._tier_fd = _map_arena(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _op(self) -> Op:
        return Op.GET_SHM

    def lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
        """A Lookup over the Unix socket: the control plane's answer without gRPC's round
        trip (the node answers it the same way; its errors are the same typed errors)."""
        return pb.LookupResponse.FromString(self._ask(Op.LOOKUP, request, "a lookup"))

    def unpin(self, request: pb.UnpinRequest) -> None:
        """An Unpin over the Unix socket, as :meth:`lookup`."""
        self._ask(Op.UNPIN, request, "an unpin")

    def reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        """A Reserve over the Unix socket, as :meth:`lookup`."""
        return pb.ReserveResponse.FromString(self._ask(Op.RESERVE, request, "a reserve"))

    def commit(self, request: pb.CommitRequest) -> pb.CommitResponse:
        """A Commit over the Unix socket, as :meth:`lookup`; but where the socket fails
        (UnavailableError) the commit may have happened: the caller must not retry it
        elsewhere as if it had not."""
        return pb.CommitResponse.FromString(self._ask(Op.COMMIT, request, "a commit"))

    def _ask(self, op: Op, request, doing: str) -> bytes:
        """One control-plane request on a pooled connection; the answer's header.
        UnavailableError where the socket fails (a node without ``op`` drops the
        connection): callers then ask over gRPC."""
        with self._connection(f"during {doing}") as sock:
            sock.sendall(pack_request(op, request.SerializeToString()))
            frame = read_frame(sock)
        if frame.type == FrameType.ERROR:
            raise frame_error(frame)
        if frame.type != FrameType.ANSWER:
            raise UnavailableError(f"node answered {doing} with a {frame.type.name} frame")
        return frame.header

    def arena(self) -> mmap.mmap:
        """The node's memory tier, mapped read-only (connecting once if not yet)."""
        if self._arena is None:
            self.probe()
        assert self._arena is not None
        return self._arena

    def map_allocated(self) -> int:
        """Map every page the node has allocated in its memory tier (all of it when the
        node prefaults) into this process's page tables; bytes mapped. A reader then pays
        no fault on the first read of an entry stored in them (a node keeps the pages it
        allocated until it exits): a long-running reader (an engine's worker) calls it once
        at start. No page is allocated by it. Mapped 256 MiB at a time, the GIL released."""
        arena, step, done = self.arena(), 256 << 20, 0
        for start, stop in _allocated(self._tier_fd, len(arena)):
            for at in range(start, stop, step):
                end = min(stop, at + step)
                if not map_pages(arena, at, end):
                    return done
                done += end - at
        return done

    def _receive(self, sock: socket.socket, asm: SlabAssembler) -> Iterator[None]:
        yield from super()._receive(sock, asm)
        sock.sendall(pack_request(Op.RELEASE))   # the node may free or evict them now

    def _copy_from_arena(self, run: pb.SlabRun, offset: int, size: int, asm: SlabAssembler,
                         pending: list) -> None:
        assert self._arena is not None
        regions = asm.fit(run, size)
        if regions is None:
            return
        if offset + size > len(self._arena):
            asm.miss(run, "arena range out of bounds")
            return
        block = asm.block(run)
        if self._copiers is None:
            asm.accept(run, regions, copy_and_digest(self._arena, offset, block))
        else:
            pending.append((run, regions, self._copiers.submit(copy_and_digest, self._arena, offset, block)))

    def close(self) -> None:
        super().close()
        if self._copiers is not None:
            self._copiers.shutdown(wait=True)
        with self._map_lock:
            if self._arena is not None:
                with contextlib.suppress(BufferError):   # still registered with a GPU: unmapped
                    self._arena.close()                  # when that goes
                self._arena = None
                os.close(self._tier_fd)
                self._tier_fd = -1


TRANSPORT_NAMES = ("auto", "shm", "ucx", "tcp", "grpc")


def choose_transport(name: str, fetch: pb.FetchDescriptor, target: str,
                     options: ClientOptions) -> Transport | None:
    """The transport ``name`` resolves to for a node with endpoints ``fetch``; None is
    gRPC. "auto": shm on the node's host; else UCX if the node's UCX has an RDMA device
    (over plain TCP our socket path is the faster one: docs/dataplane.md); else tcp;
    else UCX; else gRPC."""
    io_timeout_s = options.io_timeout_s
    if name not in TRANSPORT_NAMES:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORT_NAMES)}; got {name!r}")
    if name == "grpc":
        return None
    offered = dict(fetch.transports)
    if name in ("auto", "shm") and "shm" in offered:
        if fetch.host_id == host_id():
            shm = ShmTransport(offered["shm"], io_timeout_s, options.copy_threads, options.token)
            try:
                shm.probe()   # same boot id is not enough: a container shares it but not
                return shm    # the network namespace its abstract socket lives in
            except UnavailableError:
                if name == "shm":
                    raise
        elif name == "shm":
            raise CacheServiceError(f"{target} is on another host: shm is not possible")
    tls = options.tls_context()
    ucx_usable = "ucx" in offered and ucxlib.available() and tls is None   # UCX has no TLS
    if name == "ucx" and tls is not None:
        raise CacheServiceError(f"cannot use ucx with {target} over TLS: UCX moves bytes in the clear")
    if name == "ucx" or (name == "auto" and ucx_usable and
                         ("ucx.rdma" in offered or "tcp" not in offered)):
        if not ucx_usable:
            why = "it does not offer UCX" if "ucx" not in offered else \
                "ucxx is not installed here (pip install 'cachesvc[ucx]')"
            raise CacheServiceError(f"cannot use ucx with {target}: {why}")
        from cachesvc_client.ucx import UcxTransport   # imports ucxx, only now
        return UcxTransport(offered["ucx"], io_timeout_s, options.ucx_tls, options.ucx_net_devices)
    if name in ("auto", "tcp") and "tcp" in offered:
        return SocketTransport(offered["tcp"].decode(), io_timeout_s, tls, options.tls_server_name, options.token)
    if name == "auto":
        return None
    raise CacheServiceError(f"{target} does not offer the {name} transport "
                            f"(offers: {', '.join(sorted(offered)) or 'grpc only'})")


def frame_error(frame: Frame) -> CacheServiceError:
    """The typed error an ERROR frame carries ("STATUS:message")."""
    status, _, message = frame.header.decode(errors="replace").partition(":")
    return error_for_status(status, message)


def answer_error(frame: Frame) -> list[CacheServiceError]:
    """[] for END, [the typed error] for an ERROR frame."""
    return [frame_error(frame)] if frame.type == FrameType.ERROR else []


def _still_open(sock: socket.socket) -> bool:
    """False if the peer has closed this idle connection (or sent something unasked).
    Non-blocking for the peek: a socket with a timeout would otherwise wait it out."""
    if isinstance(sock, ssl.SSLSocket):   # no peeking through TLS: anything readable means closed
        return not sock.pending() and not select.select([sock], [], [], 0)[0]
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)     # returns only on EOF or unexpected data
        return False
    except BlockingIOError:
        return True                       # nothing to read: open and idle
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


def _map_arena(sock: socket.socket) -> tuple[mmap.mmap, int]:
    """Ask for the node's arena and map it read-only; the mapping and the arena's file
    descriptor (the caller closes it)."""
    sock.sendall(pack_request(Op.MAP))
    fds: list[int] = []
    try:
        head = bytearray()
        while len(head) < FRAME.size:
            msg, fds_now, _flags, _addr = socket.recv_fds(sock, FRAME.size - len(head), 1)
            fds += fds_now
            if not msg:
                raise ConnectionError("node closed the connection during MAP")
            head += msg
        kind, header_len, _, _ = FRAME.unpack(bytes(head))
        header = recv_exact(sock, header_len)
        if kind == FrameType.ERROR:
            raise CacheServiceError(f"MAP refused: {header.decode(errors='replace')}")
        if kind != FrameType.MAP or not fds:
            raise ConnectionError("node did not pass its memory tier")
        size = int.from_bytes(header[:8], "little")
        arena = mmap.mmap(fds[0], size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in fds[1:]:
        os.close(fd)
    os.set_inheritable(fds[0], False)   # kept open: not for the processes an engine starts
    return arena, fds[0]


def _allocated(fd: int, size: int) -> list[tuple[int, int]]:
    """The byte ranges of the first ``size`` bytes of a shared-memory file that hold pages
    (``SEEK_DATA``/``SEEK_HOLE``); none where the file system cannot tell."""
    ranges: list[tuple[int, int]] = []
    at = 0
    try:
        while at < size:
            start = os.lseek(fd, at, os.SEEK_DATA)
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
            if end <= start:
                break
            ranges.append((start, end))
            at = end
    except OSError:   # ENXIO: no data past ``at``; other errors: nothing known
        pass
    return ranges
