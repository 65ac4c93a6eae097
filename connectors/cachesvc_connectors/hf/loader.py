"""Pipelined slab loading: fetch a plan's slabs in a background thread, in the order the
consumer needs them, and let it wait for each (kind, layer) as it gets there.

The plan's load requests travel as the selections of one fetch (one round trip, not one
per range): E of the first recompute group first, so recompute can start at once, then
every other needed slab in layer order. The consumer computes on layer l while later layers
are in flight; ``wait_s`` is the time it spent blocked, ``fetch_s`` the loader's own wall
time, so ``1 - wait_s / fetch_s`` of the loading was hidden under compute.

On a GPU the loader also moves each slab to the model's device, on a stream of its own,
so the host-to-device copy is hidden with the fetch; a slab is handed out only once its
copy finished.

Slabs land in a consumer's :class:`Staging` buffers, reused from one prefill to the next:
writing into fresh memory costs a page fault per 4 KiB (0.4–1.3 GB/s on these hosts,
against 4–7 GB/s into memory already touched), and only pinned memory copies to a GPU
asynchronously.

On the node's own host a located hit needs no fetch at all: :class:`ArenaLoader` copies
each slab out of the node's memory tier when the consumer first waits for it, in the
consumer's thread (no request, no thread, no hand-off), and on a GPU copies it from the
arena, registered with CUDA as page-locked memory, straight into device memory.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cachesvc.wire.keys import FamilyId, FamilySpec, Kind
from cachesvc_client import CacheClient, CacheServiceError, Hit
from cachesvc_client.local import ArenaReader
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
            # A quarter of headroom (prompts grow a little from one request to the next), and
            # at least double: growing costs a page fault per 4 KiB, so it must be rare (a
            # server sees every length up to its longest prompt; log2 of them regrow).
            grown = max(nbytes + nbytes // 4, 2 * flat.numel() if flat is not None else 0)
            flat = torch.empty(grown, dtype=torch.uint8, pin_memory=self.pinned)
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
        """Every request in one fetch (one selection each, in the plan's order)."""
        try:
            stream = self.client.stream_selections(
                self.family_id, self.hit, [(r.kinds, (r.start, r.stop)) for r in self.requests], outs=self._out,
                as_torch=True, transport=self.transport)
            for index, layer in stream:
                req = self.requests[index]
                arrays = stream.arrays(index)
                moved = {kind: arrays[kind][layer - req.start].to(self.device, non_blocking=True)
                         for kind in req.kinds}
                if copy_stream is not None:
                    copy_stream.synchronize()
                if not self._slabs:
                    self.first_slab_s = time.perf_counter() - self._t0
                for kind in req.kinds:
                    self._slabs[(kind, layer)] = moved[kind]
                    self._ready[(kind, layer)].set()
            for slabs in stream.results():
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
            for event in self._ready.values():   # wake waiters even when the request failed
                event.set()

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


def open_loader(client: CacheClient, family: FamilySpec, family_id: FamilyId, hit: Hit,
                requests: list[LoadRequest], *, direct: bool, transport: str | None = None,
                device: torch.device | str = "cpu", staging: Staging | None = None) -> "SlabLoader | ArenaLoader":
    """The loader for ``hit``: straight out of the node's memory tier when ``direct`` and
    the hit was located there (every entry in memory, on this host's node), else over the
    data plane. Not started."""
    arena = client.arena(hit, transport) if direct and hit.locations else None
    if arena is not None:
        reader = ArenaReader(arena, family, hit)
        if reader.in_memory == hit.num_chunks:
            return ArenaLoader(reader, hit, requests, device, staging)
    return SlabLoader(client, family_id, hit, requests, transport, device, staging)


class _TierRead:
    """What both readers of a located hit in the node's memory tier keep: how many leading
    entries are usable (those in memory, lowered by any that does not read back whole)
    and why fewer than all."""

    def __init__(self, reader: ArenaReader, hit: Hit) -> None:
        self.reader, self.hit = reader, hit
        self.valid_chunks = min(hit.num_chunks, reader.in_memory)
        self.errors: list[str] = [] if self.valid_chunks == hit.num_chunks else \
            [f"chunk {self.valid_chunks} is only on disk"]
        # One call instead of a page fault per 4 KiB on first reading (a no-op where the
        # tier was mapped at start: CacheClient.map_memory_tier).
        reader.populate()

    def _short(self, entries: int, why: str) -> None:
        """Only the first ``entries`` entries are usable, because ``why``."""
        if entries < self.valid_chunks:
            self.valid_chunks = entries
            self.errors.append(why)

    def join(self) -> int:
        return self.valid_chunks


class ArenaLoader(_TierRead):
    """A located hit read out of a same-host node's memory tier, on demand, with the
    interface of :class:`SlabLoader`. Nothing runs ahead of the consumer, so
    ``hidden_fraction`` is 0 and ``wait_s`` is the copying time: on a CPU the copy
    competes for the same cores as compute anyway (docs/results.md, issue 13: a loader
    thread slowed the suffix by 10%), and no request and no thread are worth more than
    the overlap.

    The first ``wait`` for a slab of a load request reads the whole request (every
    entry, every layer of it). On a CPU each entry's span is copied and the copy
    verified (``ArenaReader.read_range``). On a GPU the span's arena bytes are verified
    in place and copied from the registered arena to the device in one strided copy on
    the compute stream, asynchronous to the host (the hit is held by a lease until the
    consumer releases it, after that stream has run).
    """

    def __init__(self, reader: ArenaReader, hit: Hit, requests: list[LoadRequest],
                 device: torch.device | str = "cpu", staging: Staging | None = None) -> None:
        self._t0 = time.perf_counter()
        super().__init__(reader, hit)
        self.device = torch.device(device)
        self.bytes_fetched = 0
        self.fetch_s = self.wait_s = self.first_slab_s = 0.0
        self.transport_used = "shm-direct"
        self._arena = _device_arena(reader.arena, self.device)
        staging = staging or Staging()
        family = reader.family
        outs = [{kind: torch.empty((r.stop - r.start, *family.slab_shape(kind, hit.num_tokens)),
                                   dtype=family.dtype.to_torch(), device=self.device) for kind in r.kinds}
                for r in requests] if self._arena is not None else \
            staging.out(family, hit.num_tokens, requests)
        # (kind, layer) -> its load request and that request's destinations
        self._request = {(kind, layer): (r, out) for r, out in zip(requests, outs, strict=True)
                         for kind in r.kinds for layer in range(r.start, r.stop)}
        self._slabs: dict[tuple[Kind, int], torch.Tensor | None] = {}

    def start(self) -> "ArenaLoader":
        return self   # nothing to start: slabs are copied when first waited for

    def run(self) -> None:
        """Copy every slab now (the consumer's ``pipelined=False``)."""
        for kind, layer in self._request:
            self.wait(kind, layer)

    def wait(self, kind: Kind, layer: int) -> torch.Tensor | None:
        key = (kind, layer)
        if key not in self._slabs:
            t0 = time.perf_counter()
            self._slabs[key] = self._load(kind, layer)
            spent = time.perf_counter() - t0
            self.fetch_s += spent
            self.wait_s += spent
            if not self.first_slab_s:
                self.first_slab_s = time.perf_counter() - self._t0
        return self._slabs[key]

    def _load(self, kind: Kind, layer: int) -> torch.Tensor | None:
        """Read the whole load request (kind, layer) belongs to, every kind of it."""
        request, out = self._request[(kind, layer)]
        layers = request.stop - request.start
        for k in request.kinds:
            rows = out[k].reshape(layers, -1).view(torch.uint8)
            if self._arena is None:   # into host memory: copied, then the copy verified
                whole = self.reader.read_range(k, request.start, request.stop, rows.numpy(), self.valid_chunks)
            else:                     # into the device: the held arena bytes verified, then DMA'd
                whole = self._to_device(k, request, rows)
            self._count(k, request.start, whole, layers)
            for at in range(request.start, request.stop):
                dest = out[k][at - request.start]   # an unregistered arena on a GPU: via pinned staging
                self._slabs[(k, at)] = dest.to(self.device, non_blocking=True) \
                    if self._arena is None and self.device.type == "cuda" else dest
        return self._slabs[(kind, layer)]

    def _count(self, kind: Kind, layer: int, whole: int, layers: int) -> None:
        """Account a read of ``layers`` layers from ``layer`` that came back whole for the
        first ``whole`` entries."""
        self.bytes_fetched += layers * sum(self.reader.family.slab_bytes(kind, lay.num_tokens)
                                           for lay in self.hit.layouts[:whole])
        self._short(whole, f"{kind.name} from layer {layer} of chunk {whole}: missing or checksum mismatch")

    def _to_device(self, kind: Kind, request: LoadRequest, rows: torch.Tensor) -> int:
        """One strided host-to-device copy per entry, from the registered arena into
        ``rows`` (uint8 ``[layers, bytes of a layer]`` on the device), on the current
        stream; the number of leading entries verified and issued."""
        assert self._arena is not None
        spans = self.reader.spans(kind, request.start, request.stop, self.valid_chunks)
        good = self.reader.verify_leading(spans)   # in parallel: one core's hashing is slower than the DMA
        position = 0
        for span in spans[:good]:
            source = self._arena[span.arena_offset:span.arena_offset + span.layers * span.size]
            rows[:, position:position + span.size].copy_(source.view(span.layers, span.size), non_blocking=True)
            position += span.size
        return good

    @property
    def hidden_fraction(self) -> float:
        return 0.0


class HeldArenaLoader(_TierRead):
    """A located hit held by a lease, read where it lies: layer by layer, each entry's K
    and V slabs as views of the node's memory tier, verified in place right before the
    caller copies them into its own cache (an engine's cache writer). One read and one
    write of the bytes, where :class:`ArenaLoader` copies into staging and the engine
    copies out of it again: 25.5 against 35.5 ms for 4096 tokens of SmolLM2 K/V (189 MB)
    into vLLM's CPU blocks on this VM.

    Safe only while a lease holds the entries: the node cannot reuse their memory, so the
    bytes verified are the bytes copied. An entry whose slab is missing or fails its
    checksum ends the usable prefix there (``valid_chunks``), as for the other loaders.
    Host memory only (on a GPU, :class:`ArenaLoader` copies from the registered arena).
    """

    def __init__(self, reader: ArenaReader, hit: Hit) -> None:
        super().__init__(reader, hit)
        self.transport_used = "shm-in-place"
        with warnings.catch_warnings():   # a read-only mapping: nothing writes through this view
            warnings.simplefilter("ignore", UserWarning)
            tier = torch.frombuffer(reader.arena, dtype=torch.uint8)
        family = reader.family
        self._first = [0, *itertools.accumulate(lay.num_tokens for lay in hit.layouts)]   # each entry's first token
        # Each entry's K and V spans over every layer, and its slabs as one view of the
        # tier ([layers, tokens, heads, dim]), worked out once per load: per layer and
        # entry, spans and three tensor ops cost ~4 of the 29 ms of loading 2048 tokens.
        self._spans = [reader.spans(kind, 0, family.num_layers, self.valid_chunks) for kind in (Kind.K, Kind.V)]
        present = min(map(len, self._spans))
        self._short(present, f"K/V of chunk {present}: missing")
        dtype, row = family.dtype.to_torch(), (family.num_kv_heads, family.head_dim)
        self._slabs = [[tier[s.arena_offset:s.arena_offset + s.layers * s.size].view(dtype)
                        .view(s.layers, lay.num_tokens, *row)
                        for s, lay in zip(spans[:present], hit.layouts[:present], strict=True)]
                       for spans in self._spans]

    def pieces(self, layer: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first token, K, V) of each usable entry's slabs of ``layer`` (``[tokens, heads,
        dim]`` views of the tier) that holds tokens of [start, stop), each verified as it
        is yielded; stops at the first that fails its checksum, lowering ``valid_chunks``
        to it."""
        stop = self.hit.num_tokens if stop is None else stop
        (keys, values), (k_slabs, v_slabs) = self._spans, self._slabs
        for i in range(self.valid_chunks):
            first = self._first[i]
            if first >= stop:
                return
            if self._first[i + 1] <= start:
                continue
            if not (self.reader.verify_slab(keys[i], layer) and self.reader.verify_slab(values[i], layer)):
                self._short(i, f"K/V of layer {layer} of chunk {i}: checksum mismatch")
                return
            yield first, k_slabs[i][layer], v_slabs[i][layer]

    def join(self) -> int:
        self._slabs = [[], []]   # the load is over: let go of the views (and through them, the mapping)
        return super().join()


# id(arena mapping) -> it as a registered uint8 tensor (None: registration failed). The
# tensor holds the mapping, so an id is never reused while its entry is here.
_REGISTERED: dict[int, torch.Tensor | None] = {}
CUDA_HOST_REGISTER_READ_ONLY = 0x08         # cudaHostRegisterReadOnly: the mapping is PROT_READ


def _device_arena(arena: mmap.mmap, device: torch.device) -> torch.Tensor | None:
    """The arena as a CPU uint8 tensor registered with CUDA as page-locked memory, so a
    copy from it to ``device`` is one DMA with no intermediate host copy; None on a CPU
    device or where registration fails (then slabs go through pinned staging).
    Registered once per mapping, which lives as long as the client's transport."""
    if device.type != "cuda":
        return None
    if id(arena) not in _REGISTERED:
        with warnings.catch_warnings():   # a read-only mapping: torch warns it is not writable
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.frombuffer(arena, dtype=torch.uint8)
        status = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(),
                                                      CUDA_HOST_REGISTER_READ_ONLY)
        # Remember a failure too (as None): registering is not retried on every prefill.
        _REGISTERED[id(arena)] = tensor if int(status) == 0 else None
    return _REGISTERED[id(arena)]
