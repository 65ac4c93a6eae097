"""Client side of the UCX data plane (node side and message layout: cachesvc.node.dataplane.ucx
and cachesvc.wire.protocol).

Every payload message is one layer of one run, received straight into its place in the
caller's buffer; run headers and checksums are those of the socket path, verified the
same way (a mismatch is a miss). One transfer at a time per transport: the worker is
progressed by the thread that waits on it. After any failure the worker is closed,
cancelling receives that still point into caller buffers, and the next transfer
starts a fresh one.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import threading
from collections.abc import Iterator, Sequence

from cachesvc.wire import ucxlib
from cachesvc.wire.protocol import (REQUEST_TAG, FrameType, Op, ProtocolError, pack_ucx_request,
                                    pack_ucx_write, unpack_frame, unpack_runs)
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc_client.codec import PutPlan, SlabAssembler
from cachesvc_client.errors import CacheServiceError, UnavailableError
from cachesvc_client.transports import answer_error, frame_error


class UcxTransport:
    """Transfers to and from one node's UCX worker."""

    name = "ucx"

    def __init__(self, node_address: bytes, io_timeout_s: float = 30.0, tls: str = "",
                 net_devices: str = "") -> None:
        self.node_address = node_address
        self.io_timeout_s = io_timeout_s
        self._settings = (tls, net_devices)
        self._worker: ucxlib.Worker | None = None
        self._lock = threading.Lock()
        self._client_id = secrets.randbits(44) or 1
        self._seq = itertools.count(1)

    def _tag(self) -> int:
        """A fresh even answer tag below 2**63 (odd ones carry a WRITE's payload)."""
        return (self._client_id << 18) | ((next(self._seq) & 0x1FFFF) << 1)

    @contextlib.contextmanager
    def _session(self, doing: str) -> Iterator[ucxlib.Worker]:
        with self._lock:
            if self._worker is None:
                try:
                    self._worker = ucxlib.Worker(*self._settings)
                except Exception as exc:
                    raise UnavailableError(f"UCX unavailable: {exc}") from None
            ok = False
            try:
                yield self._worker
                ok = True
            except (TimeoutError, ProtocolError, ConnectionError) as exc:
                raise UnavailableError(f"data plane ucx failed {doing}: {exc}") from None
            except CacheServiceError:
                ok = True   # the node answered: the worker is in step
                raise
            except Exception as exc:   # ucxx's own errors
                if type(exc).__module__.startswith("ucxx"):
                    raise UnavailableError(f"data plane ucx failed {doing}: {exc}") from None
                raise
            finally:
                if not ok:   # cancel everything still aimed at caller buffers
                    self._worker.close()
                    self._worker = None

    def probe(self) -> None:
        with self._session("connecting") as worker:
            worker.endpoint(self.node_address)

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def fetch(self, request: pb.GetSlabsRequest, asm: SlabAssembler) -> Iterator[None]:
        """Run one GetSlabs request into ``asm``; yields after every RUNS frame."""
        with self._session("mid-transfer") as worker:
            ep = worker.endpoint(self.node_address)
            tag = self._tag()
            ask = pack_ucx_request(Op.GET, tag, worker.address, request.SerializeToString())
            worker.wait([worker.send(ep, ask, REQUEST_TAG)], self.io_timeout_s)
            while True:
                frame = unpack_frame(worker.take_within(tag, self.io_timeout_s))
                if frame.type == FrameType.END:
                    return
                if frame.type == FrameType.ERROR:
                    raise frame_error(frame)
                if frame.type != FrameType.RUNS:
                    raise ProtocolError(f"unexpected {frame.type.name} frame")
                receives, landed = [], []
                for ref in unpack_runs(frame.header):
                    run = pb.SlabRun.FromString(ref.header)
                    if run.missing:
                        asm.miss(run)
                        continue
                    step = ref.size // max(run.num_layers, 1)
                    regions = asm.fit(run, ref.size)
                    if regions is not None and len(regions) != run.num_layers:
                        asm.miss(run, "run does not fit the request")
                        regions = None
                    if regions is None:   # still receive it, to stay in step
                        regions = [memoryview(bytearray(step)) for _ in range(run.num_layers)]
                    else:
                        landed.append((run, regions))
                    receives += [worker.recv(ep, region, tag) for region in regions]
                worker.wait(receives, self.io_timeout_s)
                for run, regions in landed:
                    asm.accept(run, regions)
                yield

    def write(self, reservation_id: str, plan: PutPlan, targets: Sequence[pb.EntryWriteTarget]) -> None:
        """Send every target entry's payload (its slabs as separate messages) into the
        node's reserved memory; the node answers each entry with END or ERROR."""
        with self._session("mid-write") as worker:
            ep = worker.endpoint(self.node_address)
            sends, tags, keep = [], [], []
            for target in targets:
                views = [memoryview(v).cast("B") for v in plan.payloads[target.entry_index]]
                tag = self._tag()
                body = pack_ucx_write(reservation_id, target.entry_index, 0, [len(v) for v in views])
                ask = pack_ucx_request(Op.WRITE, tag, worker.address, body)
                keep.append(ask)
                sends.append(worker.send(ep, ask, REQUEST_TAG))
                sends += [worker.send(ep, v, tag | 1) for v in views]
                tags.append(tag)
            worker.wait(sends, self.io_timeout_s)
            failures = [e for tag in tags
                        for e in answer_error(unpack_frame(worker.take_within(tag, self.io_timeout_s)))]
        if failures:
            raise failures[0]
