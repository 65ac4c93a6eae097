"""Wire format of the socket data plane (TCP and the same-host Unix socket).

All integers are little-endian. Metadata reuses the control plane's protobuf messages
(``GetSlabsRequest`` for requests, ``SlabRun`` without ``data`` for run headers), so
there is one schema; only payload bytes travel raw, straight from the server's arena
(``sendall``) into the caller's buffers (``recv_into``).

Request::

    b"CSDP" | u8 version | u8 op | u16 reserved | u32 body_len | body

    op GET      body = GetSlabsRequest; answered by RUNS frames with inline payloads, then END
    op GET_SHM  body = GetSlabsRequest; answered by RUNS frames whose payloads stay in the
                shared arena (arena_offset >= 0) or follow inline (disk-resident runs),
                then END. The server holds every entry of the request until the client
                sends RELEASE (or closes, or ``release_timeout_s`` passes).
    op RELEASE  no body, no answer
    op MAP      no body (Unix socket only); answered by a MAP frame carrying the arena's
                file descriptor (SCM_RIGHTS) and, as header, its size in bytes (u64)
    op LOOKUP   body = LookupRequest (Unix socket only); answered by an ANSWER frame whose
                header is the LookupResponse, or ERROR: the control plane's Lookup
                without gRPC's round trip, for same-host readers (docs/dataplane.md)
    op UNPIN    body = UnpinRequest (Unix socket only); answered by an ANSWER frame (an
                empty UnpinResponse) or ERROR: ends a lease a LOOKUP took, as Unpin does
    op RESERVE  body = ReserveRequest (Unix socket only); answered by an ANSWER frame whose
                header is the ReserveResponse, or ERROR: the first phase of a put, as
                Reserve does, for same-host writers
    op COMMIT   body = CommitRequest (Unix socket only); answered by an ANSWER frame (the
                CommitResponse) or ERROR: the second phase, as Commit does (Abort stays
                on gRPC: the rare path)
    op AUTH     body = the API token (UTF-8); answered by END, or ERROR after which the node
                closes the connection. On a node started with --auth-tokens it must be a
                connection's first request; every later request acts as that token's
                tenant and role (cachesvc.node.auth)
    op WRITE    body = u32 entry_index | u64 offset | u64 size | reservation id (UTF-8),
                followed by ``size`` payload bytes, which land straight in the reserved
                memory; answered by END (taken) or ERROR (the payload was consumed and
                dropped; a broken connection aborts the reservation). Reserve and Commit
                go over gRPC, or as RESERVE and COMMIT on the Unix socket.

Over UCX (cachesvc.node.dataplane.ucx) the same requests and frames travel as tagged
messages instead of a byte stream. A request goes to the node's worker on REQUEST_TAG::

    request (as above) | u64 reply_tag | u16 address_len | client worker address

and everything the node answers goes to ``reply_tag``, in order: each frame as one
message, then each inline run's payload as one message *per layer* (so it lands straight
in the caller's per-layer buffer). A UCX WRITE body adds the sizes of the payload's
parts, which follow on ``reply_tag | 1``, one message each::

    WRITE body | u32 parts | u64 size * parts   (then the reservation id, as above)

Response frame::

    u8 type | 3 pad | u32 header_len | u64 payload_len | i64 arena_offset | header | payload?

    RUNS   header = u32 count, then per run: u32 len | SlabRun (no data) | i64 arena_offset |
           u64 size; the payload is the inline runs' bytes (arena_offset == -1, not
           missing), concatenated in order. One frame per layer in layer-major order
           (or per ~4 MB), so per-slab costs are paid per frame, not per slab.
    END    no header
    ERROR  header = b"CODE:message" (CODE a gRPC status name); the request is over, the
           connection stays usable
    MAP    header = u64 arena size
    ANSWER header = a serialized response message (LookupResponse)
"""

from __future__ import annotations

import enum
import socket
import ssl
import struct
from dataclasses import dataclass

MAGIC = b"CSDP"
VERSION = 1
REQUEST = struct.Struct("<4sBBHI")
FRAME = struct.Struct("<B3xIQq")
MAX_BODY_BYTES = 16 << 20


class Op(enum.IntEnum):
    GET = 1
    GET_SHM = 2
    RELEASE = 3
    MAP = 4
    WRITE = 5
    LOOKUP = 6
    AUTH = 7
    UNPIN = 8
    RESERVE = 9
    COMMIT = 10


WRITE_HEAD = struct.Struct("<IQQ")


def pack_write(reservation_id: str, entry_index: int, offset: int, size: int) -> bytes:
    return pack_request(Op.WRITE, WRITE_HEAD.pack(entry_index, offset, size) +
                        reservation_id.encode())


REQUEST_TAG = 0xC5C5_0000_0000_0001
"""UCX tag of requests to a node; clients use tags below 2**63 for their answers."""
UCX_ROUTE = struct.Struct("<QH")


def pack_ucx_request(op: Op, reply_tag: int, address: bytes, body: bytes = b"") -> bytes:
    return pack_request(op, body) + UCX_ROUTE.pack(reply_tag, len(address)) + address


def unpack_ucx_request(message: bytes) -> tuple[Op, bytes, int, bytes]:
    """(op, body, reply_tag, client worker address) of a UCX request message."""
    if len(message) < REQUEST.size:
        raise ProtocolError("UCX request shorter than its header")
    magic, version, op, _, body_len = REQUEST.unpack_from(message)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"not a cachesvc data-plane request (magic {magic!r}, v{version})")
    end = REQUEST.size + body_len
    if len(message) < end + UCX_ROUTE.size:
        raise ProtocolError("UCX request truncated")
    reply_tag, address_len = UCX_ROUTE.unpack_from(message, end)
    address = message[end + UCX_ROUTE.size:end + UCX_ROUTE.size + address_len]
    if len(address) != address_len or not address_len:
        raise ProtocolError("UCX request without a full reply address")
    try:
        return Op(op), message[REQUEST.size:end], reply_tag, address
    except ValueError:
        raise ProtocolError(f"unknown op {op}") from None


PARTS = struct.Struct("<I")


def pack_ucx_write(reservation_id: str, entry_index: int, offset: int,
                   parts: list[int]) -> bytes:
    return (WRITE_HEAD.pack(entry_index, offset, sum(parts)) + PARTS.pack(len(parts)) +
            struct.pack(f"<{len(parts)}Q", *parts) + reservation_id.encode())


def unpack_ucx_write(body: bytes) -> tuple[str, int, int, int, list[int]]:
    """(reservation id, entry index, offset, size, part sizes) of a UCX WRITE body."""
    try:
        entry_index, offset, size = WRITE_HEAD.unpack_from(body)
        (count,) = PARTS.unpack_from(body, WRITE_HEAD.size)
        start = WRITE_HEAD.size + PARTS.size
        parts = list(struct.unpack_from(f"<{count}Q", body, start))
    except struct.error as exc:
        raise ProtocolError(f"malformed UCX WRITE: {exc}") from None
    if sum(parts) != size:
        raise ProtocolError(f"UCX WRITE parts add up to {sum(parts)}, not {size}")
    reservation_id = body[start + 8 * count:].decode(errors="replace")
    return reservation_id, entry_index, offset, size, parts


class FrameType(enum.IntEnum):
    RUNS = 1
    END = 2
    ERROR = 3
    MAP = 4
    ANSWER = 5


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    header: bytes
    payload_bytes: int
    arena_offset: int      # -1: payload (if any) follows inline


class ProtocolError(Exception):
    """The peer sent something that is not this protocol; drop the connection."""


def pack_request(op: Op, body: bytes = b"") -> bytes:
    return REQUEST.pack(MAGIC, VERSION, op, 0, len(body)) + body


def pack_frame(kind: FrameType, header: bytes = b"", payload_bytes: int = 0,
               arena_offset: int = -1) -> bytes:
    return FRAME.pack(kind, len(header), payload_bytes, arena_offset) + header


RUN_TAIL = struct.Struct("<qQ")


@dataclass(frozen=True, slots=True)
class RunRef:
    """One run inside a RUNS frame."""

    header: bytes          # serialized SlabRun without data
    arena_offset: int      # -1: inline in the frame's payload (or missing)
    size: int              # payload bytes of the run


def pack_runs(refs: list[RunRef]) -> bytes:
    parts = [struct.pack("<I", len(refs))]
    for ref in refs:
        parts += [struct.pack("<I", len(ref.header)), ref.header,
                  RUN_TAIL.pack(ref.arena_offset, ref.size)]
    return b"".join(parts)


def unpack_runs(header: bytes) -> list[RunRef]:
    try:
        (count,), pos, refs = struct.unpack_from("<I", header), 4, []
        for _ in range(count):
            (size,) = struct.unpack_from("<I", header, pos)
            run_header = header[pos + 4:pos + 4 + size]
            offset, run_bytes = RUN_TAIL.unpack_from(header, pos + 4 + size)
            refs.append(RunRef(run_header, offset, run_bytes))
            pos += 4 + size + RUN_TAIL.size
    except struct.error as exc:
        raise ProtocolError(f"malformed RUNS header: {exc}") from None
    return refs


def send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """sendall of several buffers with as few syscalls as the kernel allows (one by one
    over TLS, which has no scatter-gather send)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    if isinstance(sock, ssl.SSLSocket):
        for view in views:
            sock.sendall(view)
        return
    while views:
        sent = sock.sendmsg(views[:512])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes, or ConnectionError if the peer closes first."""
    buf = bytearray(size)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection mid-message")
        got += n


def discard(sock: socket.socket, size: int) -> None:
    """Read and drop ``size`` bytes, to keep a stream in step past a refused payload."""
    scratch = memoryview(bytearray(min(size, 1 << 20) or 1))
    while size:
        n = min(size, len(scratch))
        recv_into_exact(sock, scratch[:n])
        size -= n


def read_request(sock: socket.socket) -> tuple[Op, bytes] | None:
    """The next request, or None when the peer closed cleanly between requests."""
    if isinstance(sock, ssl.SSLSocket):   # no recv flags over TLS
        first = sock.recv(REQUEST.size)
        if first and len(first) < REQUEST.size:
            first += recv_exact(sock, REQUEST.size - len(first))
    else:
        first = sock.recv(REQUEST.size, socket.MSG_WAITALL)
    if not first:
        return None
    if len(first) != REQUEST.size:
        raise ConnectionError("peer closed the connection mid-request")
    magic, version, op, _, body_len = REQUEST.unpack(first)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"not a cachesvc data-plane request (magic {magic!r}, v{version})")
    if body_len > MAX_BODY_BYTES:
        raise ProtocolError(f"request body of {body_len} bytes is over {MAX_BODY_BYTES}")
    try:
        op = Op(op)
    except ValueError:
        raise ProtocolError(f"unknown op {op}") from None
    return op, recv_exact(sock, body_len) if body_len else b""


def unpack_frame(message: bytes) -> Frame:
    """A frame that arrived as one message (UCX)."""
    if len(message) < FRAME.size:
        raise ProtocolError("frame shorter than its header")
    kind, header_len, payload_bytes, arena_offset = FRAME.unpack_from(message)
    try:
        kind = FrameType(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}") from None
    return Frame(kind, message[FRAME.size:FRAME.size + header_len], payload_bytes, arena_offset)


def read_frame(sock: socket.socket) -> Frame:
    kind, header_len, payload_bytes, arena_offset = FRAME.unpack(recv_exact(sock, FRAME.size))
    try:
        kind = FrameType(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}") from None
    header = recv_exact(sock, header_len) if header_len else b""
    return Frame(kind, header, payload_bytes, arena_offset)


def host_id() -> str:
    """Identifies this boot of this host: the shared-memory path needs the same one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return socket.gethostname()
