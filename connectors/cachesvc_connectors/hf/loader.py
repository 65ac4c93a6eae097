"""Pipelined slab loading: fetch a plan's slabs in a background thread, in the order the
consumer needs them, and let it wait for each (kind, layer) as it gets there.

Requests run one after another (the data plane is the bottleneck, not the request
count): E of the first recompute group first, so recompute can start at once, then every
other needed slab in layer order. The consumer computes on layer l while later layers
are in flight; ``wait_s`` is the time it spent blocked, ``fetch_s`` the loader's own wall
time, so ``1 - wait_s / fetch_s`` of the loading was hidden under compute.

On a GPU the loader also moves each slab to the model's device, on a stream of its own,
so the host-to-device copy is hidden with the fetch; a slab is handed out only once its
copy finished.

Slabs land in a consumer's :class:`Staging` buffers, reused from one prefill to the next:
writing into fresh memory costs a page fault per 4 KiB (0.4–1.3 GB/s on these hosts,
against 4–7 GB/s into memory already touched), and only pinned memory copies to a GPU
asynchronously.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import torch

from cachesvc.wire.keys import FamilyId, FamilySpec, Kind
from cachesvc_client import CacheClient, CacheServiceError, Hit
from cachesvc_connectors.reuse.plan import Plan


@dataclass(frozen=True, slots=True)
class LoadRequest:
    kinds: tuple[Kind, ...]
    start: int          # first layer
    stop: int           # one past the last layer


def plan_requests(plan: Plan) -> list[LoadRequest]:
    """E of the first group first; then K/V of reused ranges and E of later groups in
    layer order."""
    first = [LoadRequest((Kind.E,), plan.groups[0][0], plan.groups[0][0] + 1)] if plan.groups else []
    rest: list[tuple[int, LoadRequest]] = [(a, LoadRequest((Kind.K, Kind.V), a, b))
                                           for a, b in plan.reused_ranges()]
    rest += [(a, LoadRequest((Kind.E,), a, a + 1)) for a, _ in plan.groups[1:]]
    return first + [r for _, r in sorted(rest, key=lambda item: item[0])]


class Staging:
    """Host buffers slabs are fetched into, one per kind, grown on demand and reused;
    pinned when the slabs go on to a GPU. Invariant: one loader uses them at a time (the
    consumer serializes its prefills), and nothing outlives a prefill that points into
    them on the host (the consumer copies K/V into its cache layout)."""

    def __init__(self, pinned: bool = False) -> None:
        self.pinned = pinned
        self._flat: dict[Kind, torch.Tensor] = {}   # uint8, capacity in bytes

    def out(self, family: FamilySpec, tokens: int, requests: list[LoadRequest]) -> list[dict[Kind, torch.Tensor]]:
        """Per request, its destination ``[layers, tokens, ...]`` per kind: disjoint rows
        of one buffer per kind."""
        rows: dict[Kind, int] = {}              # request index -> its first row, per kind
        starts = []
        for r in requests:
            starts.append({kind: rows.get(kind, 0) for kind in r.kinds})
            for kind in r.kinds:
                rows[kind] = rows.get(kind, 0) + r.stop - r.start
        dtype = family.dtype.to_torch()
        whole = {kind: self._buffer(kind, n * family.slab_bytes(kind, tokens))
                 .view(dtype).view(n, *family.slab_shape(kind, tokens)) for kind, n in rows.items()}
        return [{kind: whole[kind][at:at + r.stop - r.start] for kind, at in first.items()}
                for r, first in zip(requests, starts, strict=True)]

    def _buffer(self, kind: Kind, nbytes: int) -> torch.Tensor:
        flat = self._flat.get(kind)
        if flat is None or flat.numel() < nbytes:
            # A quarter of headroom: prompts grow a little from one request to the next.
            flat = torch.empty(nbytes + nbytes // 4, dtype=torch.uint8, pin_memory=self.pinned)
            flat.fill_(0)   # fault every page in now, not while a prefill waits
            self._flat[kind] = flat
        return flat[:nbytes]


class SlabLoader:
    """Fetches ``requests`` for the chunks of ``hit`` in a background thread."""

    def __init__(self, client: CacheClient, family_id: FamilyId, hit: Hit,
                 requests: list[LoadRequest], transport: str | None = None,
                 device: torch.device | str = "cpu", staging: Staging | None = None) -> None:
        self.client, self.family_id, self.hit = client, family_id, hit
        self.requests = requests
        self._out = staging.out(client.family(family_id), hit.num_tokens, requests) if staging \
            else [None] * len(requests)
        self.transport = transport
        self.device = torch.device(device)
        self._slabs: dict[tuple[Kind, int], torch.Tensor] = {}   # [tokens, ...] per (kind, layer)
        self._ready = {(k, layer): threading.Event()
                       for r in requests for k in r.kinds for layer in range(r.start, r.stop)}
        self.valid_chunks = hit.num_chunks   # lowered by any request that came back short
        self.errors: list[str] = []
        self.bytes_fetched = 0
        self.fetch_s = 0.0
        self.first_slab_s = 0.0          # from the start of loading to the first slab handed out
        self._t0 = 0.0
        self.wait_s = 0.0
        self.transport_used = ""
        self._background = False
        self._thread = threading.Thread(target=self.run, name="slab-loader", daemon=True)

    def start(self) -> "SlabLoader":
        """Load in the background (``run`` loads in the calling thread instead)."""
        self._background = True
        self._thread.start()
        return self

    def run(self) -> None:
        self._t0 = t0 = time.perf_counter()
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self._load_all(stream)
        self.fetch_s = time.perf_counter() - t0
        if not self._background:   # the caller waited for all of it
            self.wait_s += self.fetch_s

    def _load_all(self, copy_stream) -> None:
        for req, out in zip(self.requests, self._out, strict=True):
            try:
                stream = self.client.stream(self.family_id, self.hit, req.kinds, (req.start, req.stop),
                                            out=out, as_torch=True, transport=self.transport)
                for layer in stream:
                    moved = {kind: stream.arrays[kind][layer - req.start].to(self.device, non_blocking=True)
                             for kind in req.kinds}
                    if copy_stream is not None:
                        copy_stream.synchronize()
                    if not self._slabs:
                        self.first_slab_s = time.perf_counter() - self._t0
                    for kind in req.kinds:
                        self._slabs[(kind, layer)] = moved[kind]
                        self._ready[(kind, layer)].set()
                slabs = stream.result()
                self.transport_used = slabs.transport
                self.bytes_fetched += slabs.bytes_received
                if slabs.valid_chunks < self.valid_chunks:
                    self.valid_chunks = slabs.valid_chunks
                    self.errors += [f"{m.kind.name}{m.layer_start} of chunk {m.entry_index}: {m.reason}"
                                    for m in slabs.missing[:3]]
            except CacheServiceError as exc:   # a failed load is a miss: recompute
                self.valid_chunks = 0
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                for kind in req.kinds:         # wake waiters even when the request failed
                    for layer in range(req.start, req.stop):
                        self._ready[(kind, layer)].set()

    def wait(self, kind: Kind, layer: int) -> torch.Tensor | None:
        """The slab ``[tokens, ...]`` of (kind, layer) once loaded; None if it failed."""
        event = self._ready[(kind, layer)]
        if not event.is_set():
            t0 = time.perf_counter()
            event.wait()
            self.wait_s += time.perf_counter() - t0
        return self._slabs.get((kind, layer))

    def join(self) -> int:
        """Wait for every request; the number of leading chunks that arrived whole."""
        if self._thread.is_alive():
            t0 = time.perf_counter()
            self._thread.join()
            self.wait_s += time.perf_counter() - t0
        return self.valid_chunks

    @property
    def hidden_fraction(self) -> float:
        """Share of the fetch time the consumer did not wait for (0..1)."""
        return max(0.0, 1.0 - self.wait_s / self.fetch_s) if self.fetch_s > 0 else 0.0
