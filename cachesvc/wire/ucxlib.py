"""The few UCX operations the data plane uses, over ucxx's synchronous core API.

Shared by the node (cachesvc.node.dataplane.ucx) and the SDK's UCX transport. ucxx is an
optional extra (``pip install cachesvc[ucx]``): import this module only after
:func:`available` said yes.

Why the core API and not ucxx's asyncio one: the node and the SDK are threaded, and the
core API lets one thread own a worker and progress it itself (polling while a transfer
is in flight, sleeping on the worker's event fd when idle), which on a 2-core machine is
about twice the throughput of ucxx's default progress thread (../shared/FACTS.md).

Endpoints are built from worker addresses exchanged over the control plane, never from
a listener (a listener binds all interfaces and never uses shared memory). Such
endpoints run without UCX's endpoint error handling, so a dead peer is noticed by
deadline, not by an error callback: every wait here has one.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

# Before ucxx loads UCX: ucxx sets variables of its own that UCX then warns about.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

DEFAULT_TLS = "^cma"
"""Every UCX transport but CMA. Without endpoint error handling a CMA read from a peer
that has died aborts the whole process (``process_vm_readv ... No such process``), and
from shared memory without huge pages it ran at 1.9 GB/s against 4.3-6.9 GB/s for UCX's
posix shared-memory copies (docs/dataplane.md)."""

RDMA_MARKERS = ("rc", "ud", "dc", "gga", "srd")
"""Transport names in UCX's resource list that mean a real RDMA device."""


def available() -> bool:
    """Whether ucxx can be imported (the optional ``ucx`` extra is installed)."""
    return importlib.util.find_spec("ucxx") is not None


@functools.lru_cache(maxsize=None)
def _context(tls: str, net_devices: str) -> Any:
    """One UCX context per process and settings (UCX contexts are heavy)."""
    from ucxx._lib import libucxx as ucx
    config = {"TLS": tls or DEFAULT_TLS}
    if net_devices:
        config["NET_DEVICES"] = net_devices
    return ucx.UCXContext(config_dict=config, feature_flags=(ucx.Feature.TAG, ucx.Feature.WAKEUP))


class Worker:
    """One UCX worker, used by one thread at a time.

    Buffers handed to ``send``/``recv`` must stay alive and unchanged until their request
    completes (or is cancelled): UCX reads and writes them in place.
    """

    def __init__(self, tls: str = "", net_devices: str = "") -> None:
        from ucxx._lib import libucxx as ucx
        from ucxx._lib.arr import Array
        self._ucx, self._array = ucx, Array
        self.context = _context(tls, net_devices)
        self._worker = ucx.UCXWorker(self.context)
        self._worker.init_blocking_progress_mode()
        self.address: bytes = self._worker.address.tobytes()
        self._endpoints: OrderedDict[bytes, Any] = OrderedDict()

    @property
    def rdma(self) -> bool:
        """Whether this worker's context found an RDMA device (InfiniBand, RoCE, EFA)."""
        resources = [line.split("flags --", 1)[1].strip()
                     for line in self.context.info.splitlines() if "flags --" in line]
        return any(r.startswith(RDMA_MARKERS) for r in resources)

    def endpoint(self, address: bytes, keep: int = 256) -> Any:
        """The endpoint to the worker at ``address`` (cached; the least recently used
        of more than ``keep`` is closed)."""
        ep = self._endpoints.get(address)
        if ep is None:
            peer = self._ucx.UCXAddress.create_from_buffer(address)
            ep = self._worker.create_endpoint_from_worker_address(peer, endpoint_error_handling=False)
            self._endpoints[address] = ep
            while len(self._endpoints) > keep:
                self._endpoints.popitem(last=False)[1].close()
        self._endpoints.move_to_end(address)
        return ep

    def forget(self, address: bytes) -> None:
        """Close the endpoint to ``address``, cancelling its requests in flight."""
        ep = self._endpoints.pop(address, None)
        if ep is not None:
            ep.close()

    def send(self, ep: Any, buf: Any, tag: int) -> Any:
        return ep.tag_send(self._array(buf), tag=self._ucx.UCXXTag(tag))

    def recv(self, ep: Any, buf: Any, tag: int) -> Any:
        return ep.tag_recv(self._array(buf), tag=self._ucx.UCXXTag(tag))

    def take(self, tag: int) -> bytes | None:
        """The next message with ``tag`` if one has arrived (any sender), else None."""
        probe = self._worker.tag_probe(self._ucx.UCXXTag(tag), remove=True)
        if not probe.matched:
            return None
        buf = bytearray(probe.length)
        self.wait([self._worker.tag_recv_with_handle(self._array(buf), probe)], 5.0)
        return bytes(buf)

    def take_within(self, tag: int, idle_s: float) -> bytes:
        """The next message with ``tag``; TimeoutError after ``idle_s`` without one."""
        deadline = time.monotonic() + idle_s
        while True:
            message = self.take(tag)
            if message is not None:
                return message
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer within {idle_s:g} s")
            self._worker.progress()

    def progress(self) -> None:
        self._worker.progress()

    def idle(self, timeout_s: float) -> None:
        """Sleep until network activity or ``timeout_s``."""
        self._worker.progress_worker_event(int(timeout_s * 1000))

    def wait(self, requests: Sequence[Any], idle_s: float) -> None:
        """Progress until every request is complete, then raise the first one's error.
        TimeoutError when ``idle_s`` passes with none completing (they are then still
        in flight: cancel them before reusing their buffers)."""
        pending = [r for r in requests if not r.completed]
        deadline = time.monotonic() + idle_s
        while pending:
            self._worker.progress()
            still = [r for r in pending if not r.completed]
            if len(still) < len(pending):
                deadline = time.monotonic() + idle_s
            elif time.monotonic() > deadline:
                raise TimeoutError(f"{len(still)} UCX transfers made no progress in {idle_s:g} s")
            pending = still
        for r in requests:
            r.check_error()

    @staticmethod
    def done(requests: Sequence[Any]) -> bool:
        return all(r.completed for r in requests)

    def close(self) -> None:
        """Cancel whatever is in flight and close every endpoint."""
        self._worker.cancel_inflight_requests()
        for ep in self._endpoints.values():
            ep.close()
        self._endpoints.clear()
