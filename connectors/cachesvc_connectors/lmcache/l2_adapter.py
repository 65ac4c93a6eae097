"""A cachesvc node as L2 storage of LMCache's multiprocess server.

Configure LMCache 0.5.6 with::

    lmcache server ... --l2-adapter '{"type": "plugin",
        "module_path": "cachesvc_connectors.lmcache.l2_adapter",
        "class_name": "CachesvcL2Adapter",
        "adapter_params": {"address": "127.0.0.1:7072"}}'

where the node serves ``--lm-port 7072``. The adapter speaks the node's ``lm://``
endpoint (cachesvc.wire.lmwire) plus its LOCK / UNLOCK / DELETE extensions, not the
gRPC SDK: LMCache pins protobuf < 7 and our generated stubs need 7, so the SDK cannot
load in LMCache's process, and ``lm://`` needs nothing but sockets.

What LMCache gets from the node: eviction inside a memory budget, a disk tier that
survives restarts, checksums on disk (a rotten chunk is a failed load, never wrong
bytes), and locks that are leases (a LMCache process that dies holding locks holds
nothing longer than their lease).

Concurrency, as ``L2AdapterInterface`` asks: every ``submit_*`` returns at once; the
work runs on three worker threads of the adapter's own (store, lookup-and-unlock,
load), each with its own connection, so a long store never delays a lookup or a load;
completion is signalled on the three event fds. Requests of one batch are pipelined:
all headers go out, then the answers are read in order (the endpoint answers a
connection's requests in order). A broken connection fails the batch it was serving
(store: failed task; lookup/load: zero bits) and is re-opened for the next one.
"""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface, L2TaskId
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.platform import create_event_notifier
from lmcache.v1.protocol import DTYPE_TO_INT

from cachesvc.wire.protocol import recv_into_exact, send_parts
from cachesvc.wire.lmwire import (MAX_KEY_BYTES, RESPONSE, SUCCESS, Command, Format, pack_request,
                                  parse_response)

if TYPE_CHECKING:
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey

log = logging.getLogger(__name__)

UNLOCK_ATTEMPTS = 5


class CachesvcL2AdapterConfig(L2AdapterConfigBase):
    """``address``: HOST:PORT of the node's lm:// endpoint (required);
    ``lock_ttl_s``: how long a lookup's lock holds an entry at most (default 300);
    ``timeout_s``: longest wait for the node inside one request (default 30)."""

    def __init__(self, address: str, lock_ttl_s: int = 300, timeout_s: float = 30.0) -> None:
        self.address, self.lock_ttl_s, self.timeout_s = address, lock_ttl_s, timeout_s

    @classmethod
    def from_dict(cls, d: dict) -> "CachesvcL2AdapterConfig":
        address = d.get("address")
        if not isinstance(address, str) or ":" not in address:
            raise ValueError("address must be HOST:PORT of a cachesvc node's lm:// endpoint (--lm-port)")
        lock_ttl_s = d.get("lock_ttl_s", 300)
        if not isinstance(lock_ttl_s, int) or not 1 <= lock_ttl_s <= 3600:
            raise ValueError("lock_ttl_s must be an integer in 1..3600")
        timeout_s = d.get("timeout_s", 30.0)
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        return cls(address, lock_ttl_s, float(timeout_s))

    @classmethod
    def help(cls) -> str:
        return ("cachesvc L2 adapter config fields:\n"
                "- address (str): HOST:PORT of a cachesvc node's lm:// endpoint (required)\n"
                "- lock_ttl_s (int): lease of a lookup's lock, 1..3600 (default 300)\n"
                "- timeout_s (float): longest wait for the node in one request (default 30)")


def lm_key(key: "ObjectKey") -> str:
    """The lm:// key of an LMCache object key: every field of it, so two keys that
    differ in any field (rank, group, cache salt) never share an entry."""
    name = f"{key.model_name}@1@{key.kv_rank}@{bytes(key.chunk_hash).hex()}@l2"
    if key.object_group_id:
        name += f"@group%{key.object_group_id}"
    if key.cache_salt:
        name += f"@salt%{key.cache_salt}"
    if len(name.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"key {name[:60]}... is over lm://'s {MAX_KEY_BYTES} bytes")
    return name


def _header_of(obj: MemoryObj) -> tuple[int, int, tuple[int, ...]]:
    """(format, dtype code, shape) to store ``obj`` under: its own when lm:// can say
    them, else plain bytes (the node then keeps it opaque; the bytes are the same)."""
    shape = tuple(obj.get_shape())
    code = DTYPE_TO_INT.get(obj.get_dtype())
    if code in (None, 0, 5) or len(shape) > 4 or not shape:
        return Format.BINARY, 6, (obj.get_size(), 0, 0, 0)
    return int(obj.get_memory_format().value), code, shape


class _Link:
    """One connection to the endpoint, opened on first use and after a failure."""

    def __init__(self, address: str, timeout_s: float) -> None:
        host, port = address.rsplit(":", 1)
        self.target, self.timeout_s = (host, int(port)), timeout_s
        self.sock: socket.socket | None = None

    def _open(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection(self.target, timeout=self.timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.sock

    def reset(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, *parts: bytes | memoryview) -> None:
        send_parts(self._open(), list(parts))

    def answer(self):
        return parse_response(self.recv_exact(memoryview(bytearray(RESPONSE.size))))

    def recv_exact(self, view: memoryview) -> memoryview:
        recv_into_exact(self._open(), view)
        return view

    def ask(self, command: Command, names: list[str], ttl_s: int = 0) -> list[bool]:
        """One header-only request per name, pipelined; the answers in order."""
        self.send(b"".join(pack_request(command, n, ttl_s) for n in names))
        return [self.answer().code == SUCCESS for _ in names]


class CachesvcL2Adapter(L2AdapterInterface):
    """LMCache L2 storage in a cachesvc node (see the module docstring)."""

    def __init__(self, config: CachesvcL2AdapterConfig | dict, l1_memory_desc=None) -> None:
        super().__init__(max_capacity_bytes=0)   # the node evicts by itself, inside its own budget
        self.config = config if isinstance(config, CachesvcL2AdapterConfig) else \
            CachesvcL2AdapterConfig.from_dict(config)
        self._efd = {op: create_event_notifier() for op in ("store", "lookup", "load")}
        self._workers = {op: ThreadPoolExecutor(1, thread_name_prefix=f"cachesvc-l2-{op}")
                         for op in ("store", "lookup", "load")}
        self._links = {op: _Link(self.config.address, self.config.timeout_s) for op in self._workers}
        self._lock = threading.Lock()
        self._next_id: L2TaskId = 0
        self._stored: dict[L2TaskId, L2StoreResult] = {}
        self._looked_up: dict[L2TaskId, Bitmap] = {}
        self._loaded: dict[L2TaskId, Bitmap] = {}
        self._sizes: dict[ObjectKey, int] = {}   # what this adapter stored, for usage and delete
        self._counts = dict.fromkeys(("stored", "store_failures", "hits", "lookups", "loaded",
                                      "load_failures", "unlock_failures"), 0)
        self._last_error = ""

    # ------------------------------------------------------------ event fds

    def get_store_event_fd(self) -> int:
        return self._efd["store"].fileno()

    def get_lookup_and_lock_event_fd(self) -> int:
        return self._efd["lookup"].fileno()

    def get_load_event_fd(self) -> int:
        return self._efd["load"].fileno()

    # ------------------------------------------------------------ store

    def submit_store_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        task_id = self._task_id()
        self._workers["store"].submit(self._store, task_id, list(keys), list(objects))
        return task_id

    def pop_completed_store_tasks(self) -> dict[L2TaskId, L2StoreResult]:
        with self._lock:
            done, self._stored = self._stored, {}
        return done

    def _store(self, task_id: L2TaskId, keys: list[ObjectKey], objects: list[MemoryObj]) -> None:
        link = self._links["store"]
        fresh: list[tuple[ObjectKey, int]] = []
        ok = False
        try:
            names = [lm_key(k) for k in keys]
            present = link.ask(Command.EXIST, names)   # what the node holds already is not sent again
            for key, name, obj, have in zip(keys, names, objects, present, strict=True):
                if not have:
                    fmt, code, shape = _header_of(obj)
                    view = memoryview(obj.byte_array).cast("B")
                    link.send(pack_request(Command.PUT, name, len(view), fmt, code, shape), view)
                    fresh.append((key, len(view)))
            # PUT has no answer; the endpoint takes a connection's requests in order, so an
            # EXIST after them says whether each was stored (a full node refuses quietly).
            confirmed = link.ask(Command.EXIST, [lm_key(k) for k, _ in fresh]) if fresh else []
            ok = all(confirmed)
            fresh = [f for f, yes in zip(fresh, confirmed, strict=True) if yes]
        except (OSError, ValueError) as exc:
            link.reset()
            fresh = []
            self._failed("store", exc)
        with self._lock:   # delete() pops sizes from another thread
            stored = [(k, s) for k, s in fresh if k not in self._sizes]
            self._stored[task_id] = L2StoreResult(ok, sum(s for _, s in fresh))
            self._sizes.update(stored)
            self._counts["stored"] += len(fresh)
            self._counts["store_failures"] += not ok
        if stored:
            self._notify_keys_stored([k for k, _ in stored], [s for _, s in stored])
        self._efd["store"].notify()

    # ------------------------------------------------------------ lookup and lock

    def submit_lookup_and_lock_task(self, keys: list[ObjectKey],
                                    group_layout_descs: dict[int, MemoryLayoutDesc]) -> L2TaskId:
        task_id = self._task_id()
        self._workers["lookup"].submit(self._lookup, task_id, list(keys))
        return task_id

    def query_lookup_and_lock_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._lock:
            return self._looked_up.pop(task_id, None)

    def _lookup(self, task_id: L2TaskId, keys: list[ObjectKey]) -> None:
        link = self._links["lookup"]
        bitmap = Bitmap(len(keys))
        try:
            held = link.ask(Command.LOCK, [lm_key(k) for k in keys], self.config.lock_ttl_s)
            for i, yes in enumerate(held):
                if yes:
                    bitmap.set(i)
        except (OSError, ValueError) as exc:
            link.reset()   # locks taken before the failure let go at their lease's end
            self._failed("lookup", exc)
            held = []
        with self._lock:
            self._looked_up[task_id] = bitmap
            self._counts["lookups"] += len(keys)
            self._counts["hits"] += sum(held)
        self._efd["lookup"].notify()

    def submit_unlock(self, keys: list[ObjectKey]) -> None:
        self._workers["lookup"].submit(self._unlock, list(keys))

    def _unlock(self, keys: list[ObjectKey]) -> None:
        """Never retried by LMCache, so retried here; a lock that still cannot be let go
        lets go by itself when its lease ends (lock_ttl_s)."""
        link = self._links["lookup"]
        names = [lm_key(k) for k in keys]
        for attempt in range(UNLOCK_ATTEMPTS):
            try:
                link.ask(Command.UNLOCK, names)
                return
            except OSError as exc:
                link.reset()
                if attempt == UNLOCK_ATTEMPTS - 1:
                    with self._lock:
                        self._counts["unlock_failures"] += 1
                    self._failed("unlock", exc)

    # ------------------------------------------------------------ load

    def submit_load_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        task_id = self._task_id()
        self._workers["load"].submit(self._load, task_id, list(keys), list(objects))
        return task_id

    def query_load_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._lock:
            return self._loaded.pop(task_id, None)

    def _load(self, task_id: L2TaskId, keys: list[ObjectKey], objects: list[MemoryObj]) -> None:
        """GETs pipelined; each hit is received straight into its caller-owned buffer."""
        link = self._links["load"]
        bitmap = Bitmap(len(keys))
        loaded = 0
        try:
            link.send(b"".join(pack_request(Command.GET, lm_key(k)) for k in keys))
            for i, obj in enumerate(objects):
                head = link.answer()
                if head.code != SUCCESS:
                    continue
                view = memoryview(obj.byte_array).cast("B")
                if head.length != len(view):   # another object under this key: keep in step, miss
                    link.recv_exact(memoryview(bytearray(head.length)))
                    continue
                link.recv_exact(view)
                bitmap.set(i)
                loaded += 1
        except (OSError, ValueError) as exc:
            link.reset()
            self._failed("load", exc)
        with self._lock:
            self._loaded[task_id] = bitmap
            self._counts["loaded"] += loaded
            self._counts["load_failures"] += len(keys) - loaded
        self._efd["load"].notify()

    # ------------------------------------------------------------ delete, status, close

    def delete(self, keys: list[ObjectKey]) -> None:
        link = _Link(self.config.address, self.config.timeout_s)   # callable from any thread
        try:
            gone = link.ask(Command.DELETE, [lm_key(k) for k in keys])
        except (OSError, ValueError) as exc:
            self._failed("delete", exc)
            return
        finally:
            link.reset()
        with self._lock:
            dropped = [(k, self._sizes.pop(k)) for k, yes in zip(keys, gone, strict=True)
                       if yes and k in self._sizes]
        if dropped:
            self._notify_keys_deleted([k for k, _ in dropped], [s for _, s in dropped])

    def report_status(self) -> dict:
        link = _Link(self.config.address, self.config.timeout_s)
        try:
            healthy = link.ask(Command.HEALTH, ["status@1@0@0@l2"])[0]
        except OSError as exc:
            healthy = False
            self._failed("status", exc)
        finally:
            link.reset()
        with self._lock:
            return {"is_healthy": healthy, "type": type(self).__name__, "address": self.config.address,
                    "last_error": self._last_error, **self._counts}

    def close(self) -> None:
        for worker in self._workers.values():
            worker.shutdown(wait=True)
        for link in self._links.values():
            link.reset()
        for efd in self._efd.values():
            efd.close()

    # ------------------------------------------------------------ helpers

    def _task_id(self) -> L2TaskId:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def _failed(self, op: str, exc: BaseException) -> None:
        with self._lock:
            self._last_error = f"{op}: {exc}"
        log.warning("cachesvc L2 %s failed: %s", op, exc)


__all__ = ["CachesvcL2Adapter", "CachesvcL2AdapterConfig", "lm_key"]
