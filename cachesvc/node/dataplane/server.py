"""Socket data plane of a node: TCP for any client, a Unix socket for same-host ones.

TCP sends payloads straight from the memory tier with ``sendall`` (no copy in user
space). The Unix socket additionally hands a client the memory tier itself (the arena's
memfd, by SCM_RIGHTS) so it can copy slabs out with one memcpy. The server answers with
arena offsets and holds the entries until the client releases them. It also answers
lookups there: a same-host reader's whole request is then one round trip over this
socket (a locating lookup) and a memcpy, with no gRPC call; a reader that leased its hit
ends the lease there too (UNPIN), and a same-host writer reserves and commits its puts
there (RESERVE, COMMIT) around its WRITEs. Protocol:
cachesvc.wire.protocol.

One thread per connection: a connection carries one request at a time, and clients
keep a small pool of them.
"""

from __future__ import annotations

import array
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from cachesvc.wire.protocol import (WRITE_HEAD, FrameType, Op, ProtocolError, RunRef, discard,
                                    pack_frame, pack_runs, read_request, recv_into_exact,
                                    send_parts)
from cachesvc.wire.errors import CacheError, InvalidArgument
from cachesvc.wire.framing import slab_run_header
from cachesvc.node.auth import Principal, TokenTable, authorize
from cachesvc.node.logs import Throttled
from cachesvc.node.metrics import DATAPLANE_SECONDS
from cachesvc.node.records import ReadRun
from cachesvc.node.servicer import commit_response, lookup_response, reserve_response, selections_of
from cachesvc.node.store import CacheStore, ReadHandle
from cachesvc.v1 import cachesvc_pb2 as pb

log = logging.getLogger(__name__)

BATCH_BYTES = 4 << 20
"""Target payload of one RUNS frame outside layer-major order."""


class DataPlaneServer:
    """Listens on ``host:tcp_port`` (0 = any free port) and, with ``shm``, on an abstract
    Unix socket (no file to clean up; reachable from this host's network namespace)."""

    def __init__(self, store: CacheStore, host: str, tcp_port: int, shm: bool,
                 release_timeout_s: float = 60.0, io_timeout_s: float = 30.0,
                 tls: ssl.SSLContext | None = None, tokens: TokenTable | None = None) -> None:
        self.store = store
        self.tokens = tokens   # with tokens, a connection's first request must be AUTH
        self.tls = tls   # TCP connections speak TLS with this context (the Unix socket stays plain)
        self.release_timeout_s = release_timeout_s
        # Bounds every wait for a peer inside a request: a WRITE holds its reservation's
        # lock while receiving, and a stalled writer must not hold it (or the reaper) forever.
        self.io_timeout_s = io_timeout_s
        self._tcp = socket.create_server((host, tcp_port), reuse_port=False)
        self.tcp_address = f"{host}:{self._tcp.getsockname()[1]}"
        self._unix: socket.socket | None = None
        self.unix_name = ""
        if shm:
            self.unix_name = f"\0cachesvc-{secrets.token_hex(8)}"
            self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._unix.bind(self.unix_name)
            self._unix.listen(64)
        # This node's endpoints, answered with every lookup; set once they are all known.
        self.fetch = pb.FetchDescriptor()
        # The node's cluster agent, if it is in one (a COMMIT flushes the global index); set
        # once it is made, before any client can reach the node.
        self.cluster = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, bool] = {}   # connection -> busy with a request
        self._dropped = Throttled(log)                # peers sending garbage must not flood the log
        self._idle = threading.Condition(self._lock)   # notified when a connection ends

    def transports(self) -> dict[str, bytes]:
        out = {"tcp": self.tcp_address.encode()}
        if self._unix is not None:
            out["shm"] = self.unix_name.encode()
        return out

    def start(self) -> None:
        for listener, local in ((self._tcp, False), (self._unix, True)):
            if listener is not None:
                threading.Thread(target=self._accept_loop, args=(listener, local),
                                 name="dataplane-accept", daemon=True).start()

    def stop(self, grace_s: float) -> None:
        """Stop accepting; close idle connections now and busy ones after ``grace_s``."""
        self._stopping.set()
        for listener in (self._tcp, self._unix):
            if listener is not None:
                _shutdown(listener)   # wakes the accept() blocked on it
                listener.close()
        with self._lock:
            idle = [c for c, busy in self._conns.items() if not busy]
        for conn in idle:
            _shutdown(conn)
        deadline = time.monotonic() + grace_s
        with self._lock:
            while self._conns and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            left = list(self._conns)
        for conn in left:
            _shutdown(conn)

    # ------------------------------------------------------------ connections

    def _accept_loop(self, listener: socket.socket, local: bool) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return   # listener closed
            if not local:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns[conn] = False
            threading.Thread(target=self._serve, args=(conn, local), name="dataplane-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, local: bool) -> None:
        try:
            if self.tls is not None and not local:
                conn.settimeout(self.io_timeout_s)   # a peer that never finishes its handshake
                conn = self._secure(conn)
                conn.settimeout(None)
            principal = None
            while not self._stopping.is_set():
                request = read_request(conn)
                if request is None:
                    return
                with self._lock:
                    self._conns[conn] = True
                conn.settimeout(self.io_timeout_s)
                op, body = request
                if self.tokens is not None and op != Op.AUTH and principal is None:
                    conn.sendall(error_frame("UNAUTHENTICATED", "this node requires an AUTH request first"))
                    raise ProtocolError(f"{op.name} before AUTH")
                with DATAPLANE_SECONDS.labels(op.name.lower(), "shm" if local else "tcp").time():
                    if op == Op.AUTH:
                        principal = self._auth(conn, body)
                    elif op == Op.MAP:
                        self._send_map(conn, local)
                    elif op in (Op.GET, Op.GET_SHM):
                        self._get(conn, body, principal, shm=op == Op.GET_SHM and local)
                    elif op == Op.WRITE:
                        self._write(conn, body, principal)
                    elif op == Op.LOOKUP:
                        self._control(conn, body, local, principal, op, "Lookup", pb.LookupRequest,
                                      lambda r: lookup_response(self.store, r, self.fetch).SerializeToString())
                    elif op == Op.UNPIN:
                        self._control(conn, body, local, principal, op, "Unpin", pb.UnpinRequest, self._unpin)
                    elif op == Op.RESERVE:
                        self._control(conn, body, local, principal, op, "Reserve", pb.ReserveRequest,
                                      lambda r: reserve_response(self.store, r).SerializeToString())
                    elif op == Op.COMMIT:
                        self._control(conn, body, local, principal, op, "Commit", pb.CommitRequest,
                                      lambda r: commit_response(self.store, self.cluster, r).SerializeToString())
                conn.settimeout(None)   # idle pooled connections may wait indefinitely
                with self._lock:
                    self._conns[conn] = False
        except (ProtocolError, ConnectionError, OSError) as exc:   # ssl.SSLError is an OSError
            if not self._stopping.is_set():
                self._dropped.info("data-plane connection dropped", why=str(exc))
        finally:
            with self._lock:
                self._conns.pop(conn, None)
                self._idle.notify_all()
            conn.close()

    def _secure(self, conn: socket.socket) -> socket.socket:
        """The TLS side of an accepted TCP connection (handshake done); it replaces the
        plain socket in the connection table, so stop() shuts down the right one."""
        assert self.tls is not None
        secure = self.tls.wrap_socket(conn, server_side=True)
        with self._lock:
            self._conns.pop(conn, None)
            self._conns[secure] = False
        return secure

    def _send_map(self, conn: socket.socket, local: bool) -> None:
        if not local:
            conn.sendall(error_frame("FAILED_PRECONDITION", "MAP is only offered on the Unix socket"))
            return
        arena = self.store.arena
        frame = pack_frame(FrameType.MAP, arena.capacity_bytes.to_bytes(8, "little"))
        conn.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [arena.fd]))])

    def _auth(self, conn: socket.socket, body: bytes) -> Principal | None:
        """The connection's caller; a bad token is answered, then the connection closed."""
        if self.tokens is None:
            conn.sendall(pack_frame(FrameType.END))    # nothing to check: accepted
            return None
        try:
            principal = self.tokens.principal(body.decode("utf-8", errors="replace"))
        except CacheError as exc:
            conn.sendall(error_frame(exc.status, str(exc)))
            raise ProtocolError("bad token") from None
        conn.sendall(pack_frame(FrameType.END))
        return principal

    def _get(self, conn: socket.socket, body: bytes, principal: Principal | None, shm: bool) -> None:
        try:
            runs, layer_major = open_read(self.store, body, "shm" if shm else "tcp", principal)
        except CacheError as exc:
            conn.sendall(error_frame(exc.status, str(exc)))
            return
        try:
            self._send_runs(conn, runs, shm, layer_major)
            if shm:
                self._await_release(conn)
        finally:
            runs.close()   # releases every entry of the request

    def _control(self, conn: socket.socket, body: bytes, local: bool, principal: Principal | None, op: Op,
                 method: str, message_type, answer: Callable[[Any], bytes]) -> None:
        """A control-plane call (``method``, sent as ``op``) as the servicer answers it (same
        validation, same errors), for a same-host client spared gRPC's round trip:
        ``answer`` turns the parsed request into the ANSWER frame's header."""
        if not local:
            conn.sendall(error_frame("FAILED_PRECONDITION", f"{op.name} is only offered on the Unix socket"))
            return
        try:
            request = _parse(message_type, body)
            if principal is not None:
                authorize(principal, method, request)
            header = answer(request)
        except CacheError as exc:
            conn.sendall(error_frame(exc.status, str(exc)))
            return
        conn.sendall(pack_frame(FrameType.ANSWER, header))

    def _unpin(self, request: pb.UnpinRequest) -> bytes:
        self.store.unpin(request.lease_id)
        return pb.UnpinResponse().SerializeToString()

    def _write(self, conn: socket.socket, body: bytes, principal: Principal | None) -> None:
        """Receive one piece of a reserved entry straight into the memory tier (the
        reservation id, a secret the writer got from its Reserve, names the tenant)."""
        if len(body) < WRITE_HEAD.size:
            raise ProtocolError("WRITE body too short")
        entry_index, offset, size = WRITE_HEAD.unpack_from(body)
        reservation_id = body[WRITE_HEAD.size:].decode(errors="replace")
        try:
            if principal is not None:
                authorize(principal, "WriteSlabs", None)
            self.store.write_from(reservation_id, entry_index, offset, size,
                                  lambda dest: recv_into_exact(conn, dest))
        except CacheError as exc:
            discard(conn, size)            # keep the stream in step
            conn.sendall(error_frame(exc.status, str(exc)))
            return
        except (ConnectionError, OSError):
            try:                           # the writer died mid-payload: nothing may show
                self.store.abort(reservation_id)
            except CacheError:
                pass
            raise
        conn.sendall(pack_frame(FrameType.END))

    def _send_runs(self, conn: socket.socket, runs: ReadHandle, shm: bool, layer_major: bool) -> None:
        for batch in run_batches(runs, shm, layer_major):
            send_parts(conn, [pack_frame(FrameType.RUNS, batch.header, batch.inline_bytes),
                              *batch.inline])
        conn.sendall(pack_frame(FrameType.END))

    def _await_release(self, conn: socket.socket) -> None:
        """Hold the entries until the client has copied them out of the arena."""
        conn.settimeout(self.release_timeout_s)
        try:
            request = read_request(conn)
        except TimeoutError:
            log.warning("shm client did not release in time; dropping it",
                        extra={"timeout_s": self.release_timeout_s})
            raise ConnectionError("release timeout") from None
        finally:
            conn.settimeout(self.io_timeout_s)
        if request is None:
            raise ConnectionError("client closed before releasing")
        if request[0] != Op.RELEASE:
            raise ProtocolError(f"expected RELEASE after a GET_SHM, got {request[0].name}")


def open_read(store: CacheStore, body: bytes, path: str, principal: Principal | None = None
              ) -> tuple[ReadHandle, bool]:
    """Start the read a serialized GetSlabsRequest asks for: (its runs, layer_major), as
    ``principal`` (bound to its tenant) when the node checks tokens. Raises CacheError
    (InvalidArgument for a body that is not a valid request)."""
    req = _parse(pb.GetSlabsRequest, body)
    if principal is not None:
        authorize(principal, "GetSlabs", req)
    return store.read_selections(req.tenant, req.family_id, req.entry_ids, selections_of(req), req.layer_major,
                                 path), req.layer_major


def _parse(message_type, body: bytes):
    """A request body as ``message_type``; InvalidArgument when it is not one."""
    try:
        return message_type.FromString(body)
    except DecodeError as exc:
        raise InvalidArgument(f"bad {message_type.__name__}: {exc}") from None


@dataclass(frozen=True, slots=True)
class RunBatch:
    """One RUNS frame's worth of runs."""

    header: bytes                         # packed run headers (protocol.pack_runs)
    inline: list[bytes | memoryview]      # payloads that travel in the frame, in order
    layers: list[int]                     # layers in each inline payload (equal slabs)

    @property
    def inline_bytes(self) -> int:
        return sum(len(d) for d in self.inline)


def run_batches(runs: Iterable[ReadRun], shm: bool, layer_major: bool) -> Iterator[RunBatch]:
    """The runs of a read grouped into RUNS frames.

    One frame per layer in layer-major order (a layer is never held back by the next),
    otherwise one per ~BATCH_BYTES. With ``shm`` a run in the memory tier travels as
    its arena offset instead of inline bytes.
    """
    refs: list[RunRef] = []
    inline: list[bytes | memoryview] = []
    layers: list[int] = []
    batch_bytes, batch_layer = 0, -1
    for run in runs:
        if refs and (batch_bytes + len(run.data) > BATCH_BYTES or
                     (layer_major and run.layer_start != batch_layer)):
            yield RunBatch(pack_runs(refs), inline, layers)
            refs, inline, layers, batch_bytes = [], [], [], 0
        batch_layer = run.layer_start
        in_arena = shm and run.arena_offset >= 0 and not run.missing_reason
        refs.append(RunRef(slab_run_header(run).SerializeToString(),
                           run.arena_offset if in_arena else -1, len(run.data)))
        if len(run.data) and not in_arena:
            inline.append(run.data)
            layers.append(run.num_layers)
        batch_bytes += len(run.data)
    if refs:
        yield RunBatch(pack_runs(refs), inline, layers)


def error_frame(status: str, message: str) -> bytes:
    return pack_frame(FrameType.ERROR, f"{status}:{message}".encode())


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass

