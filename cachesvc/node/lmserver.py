"""LMCache's ``lm://`` remote protocol served by a node (``cachesvc serve --lm-port``).

An unmodified LMCache (``remote_url: lm://host:port``) then stores its chunks here and
gets, over the same bytes, what LMCache's own ``python -m lmcache.v1.server`` lacks:
eviction inside a memory budget, the disk tier (chunks survive a restart), checksums
(a chunk that rotted on disk is a miss, never wrong bytes), limits, and stats.
Objects map onto entries as cachesvc.node.lmobjects describes; framing is
cachesvc.wire.lmwire.

As in LMCache's server, one thread serves one connection and answers its requests in
order, so a PUT (which has no reply) is visible to every later request on that
connection. A request that cannot be followed (unknown command, a header whose sizes
disagree, an oversize length, a key that is not LMCache's) closes that connection with
one log line (throttled); nothing of it is stored and the node serves on.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

from cachesvc.node.lmobjects import LmObjects, ObjectShape
from cachesvc.node.logs import Throttled
from cachesvc.node.store import MAX_LEASE_TTL_S, CacheStore
from cachesvc.wire.errors import CacheError, NotFound, ResourceExhausted
from cachesvc.wire.keys import Kind
from cachesvc.wire.lmwire import (FAIL, REQUEST, SUCCESS, Command, LmProtocolError, Request,
                                  model_of_key, pack_response, parse_request)
from cachesvc.wire.protocol import discard, recv_into_exact, send_parts

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
LOCK_TTL_S = 300
"""How long a LOCK holds an entry when the locker names no time (an adapter that dies
without unlocking then holds nothing longer than this)."""
MAX_LOCKED_KEYS = 100_000


class LmEndpoint:
    """Listens on ``host:port`` (0 = any free port; ``port`` says which)."""

    def __init__(self, store: CacheStore, host: str, port: int, tenant: str, max_object_bytes: int,
                 io_timeout_s: float, keys_path: Path | None) -> None:
        self.objects = LmObjects(store, tenant, keys_path, max_object_bytes)
        self.store = store
        self.io_timeout_s = io_timeout_s
        self._listener = socket.create_server((host, port))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._dropped = Throttled(log)
        self._locks: dict[str, list[tuple[str, float]]] = {}   # key -> its LOCKs' (lease id, deadline)

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="lm-accept", daemon=True).start()

    def stop(self) -> None:
        """Stop accepting and close every connection (LMCache clients reconnect)."""
        self._stopping.set()
        _shutdown(self._listener)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            with self._lock:
                full = len(self._conns) >= MAX_CONNECTIONS
                if not full:
                    self._conns.add(conn)
            if full:
                self._dropped.info("lm:// connection refused: too many connections", limit=MAX_CONNECTIONS)
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, f"{peer[0]}:{peer[1]}"), name="lm-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        header = memoryview(bytearray(REQUEST.size))
        try:
            while not self._stopping.is_set():
                if not _recv_header(conn, header):
                    return
                request = parse_request(header)
                conn.settimeout(self.io_timeout_s)   # a stalled PUT must not hold its reservation
                self._handle(conn, request)
                conn.settimeout(None)
        except (LmProtocolError, CacheError) as exc:
            self._dropped.info("lm:// connection closed: bad request", peer=peer, why=str(exc))
        except (ConnectionError, OSError) as exc:
            if not self._stopping.is_set():
                self._dropped.info("lm:// connection dropped", peer=peer, why=str(exc))
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, conn: socket.socket, req: Request) -> None:
        if req.command == Command.PUT:
            self._put(conn, req)
        elif req.command == Command.GET:
            self._get(conn, req)
        elif req.command == Command.EXIST:
            found = self.objects.find(req.key) is not None
            conn.sendall(pack_response(SUCCESS if found else FAIL))
        elif req.command == Command.HEALTH:
            conn.sendall(pack_response(SUCCESS))
        elif req.command == Command.LOCK:
            conn.sendall(pack_response(SUCCESS if self._lock_key(req.key, req.length) else FAIL))
        elif req.command == Command.UNLOCK:
            self._unlock_key(req.key)
            conn.sendall(pack_response(SUCCESS))
        elif req.command == Command.DELETE:
            found = self.objects.find(req.key)
            if found is not None:
                self.store.delete(self.objects.tenant, found.family_id, [found.meta.entry_id], [])
            conn.sendall(pack_response(SUCCESS if found is not None else FAIL))
        elif req.command == Command.LIST:
            body = "\n".join(self.objects.keys()).encode("utf-8")
            send_parts(conn, [pack_response(SUCCESS, len(body)), body])

    def _put(self, conn: socket.socket, req: Request) -> None:
        existing = self.objects.find(req.key)   # also refuses a key that is not LMCache's
        try:
            placement = self.objects.placement(model_of_key(req.key),
                                               ObjectShape(req.fmt, req.dtype_code, req.shape, req.length))
        except CacheError as exc:   # the header itself is wrong: the stream cannot be trusted
            raise LmProtocolError(str(exc)) from None
        if existing is not None and existing.family_id == placement.family_id and \
                existing.meta.num_tokens == placement.num_tokens:
            discard(conn, req.length)   # keys name their content: the stored copy (same shape) stands
            # and, offered again, counts as used: the client will read it back (evicted last)
            self.store.touch(self.objects.tenant, existing.family_id, [existing.meta.entry_id])
            return
        try:
            res = self.store.reserve(self.objects.tenant, placement.family_id, placement.producer,
                                     [self.objects.entry_input(req.key, placement)])
        except ResourceExhausted as exc:
            discard(conn, req.length)   # full: LMCache has no way to hear it; later GETs miss
            self._dropped.info("lm:// PUT not stored", key=req.key[:80], why=str(exc))
            return
        if res.already_present[0]:
            discard(conn, req.length)
            self.store.commit(res.reservation_id)
            return
        try:
            self.store.write_from(res.reservation_id, 0, 0, req.length, lambda dest: recv_into_exact(conn, dest))
            self.store.commit(res.reservation_id, seal=True)
        except BaseException:
            try:   # the writer died mid-payload: nothing of it may show
                self.store.abort(res.reservation_id)
            except CacheError:
                pass
            raise
        if existing is not None and existing.family_id != placement.family_id:
            # The key now names an object of another shape: the old one must not answer a GET.
            self.store.delete(self.objects.tenant, existing.family_id, [existing.meta.entry_id], [])
        self.objects.stored(req.key)

    def _lock_key(self, key: str, ttl_s: int) -> bool:
        found = self.objects.find(key)
        if found is None:
            return False
        ttl = min(ttl_s, MAX_LEASE_TTL_S) if ttl_s > 0 else LOCK_TTL_S
        lease_id, held = self.store.pin(self.objects.tenant, found.family_id, [found.meta.entry_id], ttl)
        if not held:   # deleted between find and pin
            self.store.unpin(lease_id)
            return False
        now = time.monotonic()
        with self._lock:
            leases = [lease for lease in self._locks.get(key, ()) if lease[1] > now]   # expired ones let go
            leases.append((lease_id, now + ttl))
            self._locks[key] = leases
            if len(self._locks) > MAX_LOCKED_KEYS:   # keys locked and never unlocked: forget expired ones
                self._locks = {k: v for k, v in self._locks.items() if any(d > now for _, d in v)}
        return True

    def _unlock_key(self, key: str) -> None:
        with self._lock:
            leases = self._locks.get(key)
            lease = leases.pop() if leases else None
            if leases == []:
                del self._locks[key]
        if lease is not None:
            try:
                self.store.unpin(lease[0])
            except NotFound:
                pass   # expired: already let go

    def _get(self, conn: socket.socket, req: Request) -> None:
        found = self.objects.find(req.key)
        if found is None:
            conn.sendall(pack_response(FAIL))
            return
        meta, shape = found.meta, found.shape
        kinds = sorted({s.kind for s in meta.slabs}) or [Kind.K]
        with self.store.read(self.objects.tenant, found.family_id, [meta.entry_id], kinds, 0, 0,
                             path="lm") as runs:
            parts = []
            for run in runs:
                if run.missing_reason:   # evicted meanwhile, or failed its checksum on disk
                    conn.sendall(pack_response(FAIL))
                    return
                parts.append(run.data)
            send_parts(conn, [pack_response(SUCCESS, shape.length, shape.fmt, shape.dtype_code, shape.shape),
                              *parts])


def _recv_header(conn: socket.socket, header: memoryview) -> bool:
    """The next request header; False when the peer closed cleanly between requests."""
    n = conn.recv_into(header)
    if n == 0:
        return False
    if n < len(header):
        recv_into_exact(conn, header[n:])
    return True


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
