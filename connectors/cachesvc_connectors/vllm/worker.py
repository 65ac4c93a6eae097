"""Worker side of the vLLM connector: loads hits into vLLM's paged KV blocks layer by
layer, saves whole new chunks after prefill, and reports what failed to load.

Loading uses the HF connector's loaders (``hf.loader``). On the node's host, a located hit
whose lease still holds is read where it lies in the node's memory tier: each entry's
slabs are verified in place and vLLM's CPU cache writer copies them straight into the
request's blocks (``HeldArenaLoader``); without the writer or a live lease it is copied out
and verified first (``ArenaLoader``). Elsewhere it streams over the data plane, layer by
layer, from a background thread (``SlabLoader``). ``wait_for_layer_load(layer)`` waits for
that layer only and writes its tokens into the request's blocks, so the forward pass starts
on layer 0 while later layers are still arriving. The worker maps the node's memory tier
into its page tables once, at start and in the background (``map_memory_tier``), so a load
does not pay a page fault per 4 KiB of entries another process stored.

A slab that is missing or fails its checksum ends the usable prefix at its chunk; the
blocks from there to the end of the load are reported by ``get_block_ids_with_load_errors``
in the same step (sync loading), and vLLM (``kv_load_failure_policy="recompute"``)
recomputes them: never wrong KV. Whatever else fails in a load does the same.

Saving gathers each layer's new chunks out of the paged blocks as that layer finishes
(``save_kv_layer``) and puts them in one batch in ``wait_for_save``: a put is atomic, so
a chunk is visible whole, with every layer, or not at all.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from dataclasses import dataclass, field

import torch

from cachesvc.wire.keys import Kind
from cachesvc_client import CacheClient, CacheServiceError, EntryData
from cachesvc_client.local import ArenaReader
from cachesvc_connectors.hf.loader import ArenaLoader, HeldArenaLoader, LoadRequest, SlabLoader, Staging, open_loader
from cachesvc_connectors.vllm.identity import ConnectorConfig, EngineIdentity
from cachesvc_connectors.vllm.meta import CachesvcMetadata, LoadSpec
from cachesvc_connectors.vllm.paged import PagedLayout, UnsupportedLayout, layout_of

log = logging.getLogger(__name__)
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
LEASE_MARGIN_S = 5.0
"""A hit is read in place only if its lease holds this much longer (clock skew between
processes, a slow step)."""


@dataclass
class _Load:
    spec: LoadSpec
    loader: SlabLoader | ArenaLoader | HeldArenaLoader
    slots: torch.Tensor | None = None  # in place: the slot of each token of [start, stop)
    failed_from: int | None = None     # first token that did not load (None: all did so far)


@dataclass
class _Save:
    """One request's chunks of this step: (kind, layer) -> ``[chunks * chunk, H, D]``."""

    first: int
    hashes: tuple[bytes, ...]
    blocks: torch.Tensor
    slabs: dict[tuple[Kind, int], torch.Tensor] = field(default_factory=dict)


class WorkerSide:
    def __init__(self, client: CacheClient, identity: EngineIdentity, config: ConnectorConfig,
                 block_size: int) -> None:
        self.client, self.identity, self.config = client, identity, config
        self.block_size = block_size
        self.chunk = client.chunk_size()
        self.family = identity.family
        self.layers: dict[str, int] = {}        # attention layer name -> decoder layer index
        self.caches: dict[str, torch.Tensor] = {}
        self.layout: PagedLayout | None = None
        self._disabled = ""                     # why the connector is off (a layout it cannot read)
        self._stagings: list[Staging] = []     # one per load of a step, reused step after step
        self._loads: list[_Load] = []
        self._saves: list[_Save] = []
        self._failed_blocks: set[int] = set()
        # This step's time per phase (s), logged at DEBUG when the step loaded or saved.
        self._step_s = dict.fromkeys(("start", "wait", "scatter", "settle", "gather", "put"), 0.0)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        for name, tensor in kv_caches.items():
            match = _LAYER_INDEX.search(name)
            if match is None:
                raise ValueError(f"cannot tell the decoder layer of KV cache {name!r}")
            self.layers[name] = int(match.group(1))
            self.caches[name] = tensor
        if len(self.layers) != self.family.num_layers:
            self._disabled = (f"{len(self.layers)} KV cache layers for a family of {self.family.num_layers}: "
                              "hybrid or cross-layer caches are not supported")
        first = next(iter(kv_caches.values()))
        try:
            self.layout = layout_of(first, self.block_size, self.family.num_kv_heads, self.family.head_dim)
        except UnsupportedLayout as exc:
            self._disabled = str(exc)
        if self._disabled:
            log.warning("cachesvc connector inactive (vLLM prefills as without it): %s", self._disabled)
        elif self.config.load and first.device.type == "cpu":
            threading.Thread(target=self._map_tier, name="cachesvc-map-tier", daemon=True).start()

    def _map_tier(self) -> None:
        try:
            mapped = self.client.map_memory_tier(self.config.transport)
        except (CacheServiceError, OSError) as exc:   # no node yet: loads map what they read instead
            log.info("cachesvc: memory tier not mapped at start: %s", exc)
            return
        log.debug("cachesvc: mapped %d MiB of the node's memory tier", mapped >> 20)

    def _ready(self) -> bool:
        """Whether loads can be written; on first use (inside a forward pass) also learns
        how vLLM's CPU backend packs blocks, from its attention layers."""
        if self._disabled or self.layout is None:
            return False
        if self.layout.name == "cpu" and self.layout.isa is None:
            from vllm.forward_context import get_forward_context
            isas = {getattr(layer, "isa", None) for layer in get_forward_context().no_compile_layers.values()}
            isas.discard(None)
            if len(isas) != 1:
                self._disabled = f"cannot tell how vLLM's CPU backend packs blocks (ISAs {sorted(isas)})"
                log.warning("cachesvc connector inactive: %s", self._disabled)
                return False
            self.layout = dataclasses.replace(self.layout, isa=isas.pop())
            if not self.layout.readable:
                log.warning("cachesvc connector loads but does not save: vLLM's CPU attention ISA %r packs "
                            "blocks in a layout it cannot read", self.layout.isa)
        return True

    # ------------------------------------------------------------ load

    def start_load(self, meta: CachesvcMetadata) -> None:
        if not meta.loads:
            return
        if not self._ready():
            for spec in meta.loads:   # nothing is written: every loaded block must be recomputed
                self._fail(spec, spec.start)
            return
        t0 = time.perf_counter()
        device = next(iter(self.caches.values())).device
        requests = [LoadRequest((Kind.K, Kind.V), 0, self.family.num_layers)]
        while len(self._stagings) < len(meta.loads):
            self._stagings.append(Staging())
        for spec, staging in zip(meta.loads, self._stagings, strict=False):
            try:
                load = self._held(spec, device) or _Load(spec, open_loader(
                    self.client, self.family, self.identity.family_id, spec.hit, requests, direct=True,
                    transport=self.config.transport, device=device, staging=staging).start())
            except CacheServiceError as exc:
                log.warning("cachesvc load of %s failed to start: %s", spec.req_id, exc)
                self._fail(spec, spec.start)
                continue
            self._loads.append(load)
        self._step_s["start"] += time.perf_counter() - t0

    def _held(self, spec: LoadSpec, device: torch.device) -> _Load | None:
        """An in-place load of ``spec`` where it can be one: vLLM's CPU writer, the hit in
        this host's node's memory tier, and its lease good for a while yet."""
        assert self.layout is not None
        if not (self.layout.writes_slots and spec.lease_id and time.time() < spec.lease_until - LEASE_MARGIN_S):
            return None
        arena = self.client.arena(spec.hit, self.config.transport)
        if arena is None:
            return None
        reader = ArenaReader(arena, self.family, spec.hit)
        if reader.in_memory < spec.hit.num_chunks:
            return None
        blocks = torch.tensor(spec.block_ids, dtype=torch.long, device=device)
        return _Load(spec, HeldArenaLoader(reader, spec.hit), self.layout.slots(blocks))

    def wait_layer(self, layer_name: str) -> None:
        index = self.layers.get(layer_name)
        if index is None or not self._loads:
            return
        assert self.layout is not None
        kv = self.caches[layer_name]
        for load in self._loads:
            if load.failed_from is not None:
                continue
            if isinstance(load.loader, HeldArenaLoader):
                self._write_in_place(load, load.loader, index, kv)
                continue
            t0 = time.perf_counter()
            k, v = load.loader.wait(Kind.K, index), load.loader.wait(Kind.V, index)
            t1 = time.perf_counter()
            self._step_s["wait"] += t1 - t0
            spec = load.spec
            if k is None or v is None:
                load.failed_from = spec.start
                continue
            blocks = torch.tensor(spec.block_ids, dtype=torch.long, device=kv.device)
            self.layout.scatter(kv, blocks, k[spec.start:spec.stop], v[spec.start:spec.stop])
            self._step_s["scatter"] += time.perf_counter() - t1

    def _write_in_place(self, load: _Load, loader: HeldArenaLoader, layer: int, kv: torch.Tensor) -> None:
        """Each entry's slabs of ``layer``, verified in place (``wait``), written into the
        request's slots by vLLM's writer (``scatter``); a failed entry ends the load there
        (``_finish_loads`` reports the rest)."""
        assert self.layout is not None and load.slots is not None
        start, stop = load.spec.start, load.spec.stop
        halves = self.layout.halves(kv)
        pieces = loader.pieces(layer, start, stop)
        while True:
            t0 = time.perf_counter()
            piece = next(pieces, None)
            t1 = time.perf_counter()
            self._step_s["wait"] += t1 - t0
            if piece is None:
                return
            first, k, v = piece
            lo, hi = max(first, start), min(first + len(k), stop)
            self.layout.write(halves, load.slots[lo - start:hi - start], k[lo - first:hi - first],
                              v[lo - first:hi - first])
            self._step_s["scatter"] += time.perf_counter() - t1

    def _finish_loads(self) -> None:
        """After the forward pass: which loaded tokens arrived whole (checksums included)."""
        t0 = time.perf_counter()
        for load in self._loads:
            spec = load.spec
            valid_chunks = load.loader.join()
            valid_tokens = sum(lay.num_tokens for lay in spec.hit.layouts[:valid_chunks])
            failed_from = min(load.failed_from if load.failed_from is not None else spec.stop, valid_tokens)
            if failed_from < spec.stop:
                log.warning("cachesvc load of %s: tokens from %d recomputed (%s)", spec.req_id, failed_from,
                            "; ".join(load.loader.errors[:2]))
                self._fail(spec, failed_from)
            self._release(spec.lease_id)
        self._loads.clear()
        self._step_s["settle"] += time.perf_counter() - t0

    def _fail(self, spec: LoadSpec, from_token: int) -> None:
        first = max(from_token, spec.start) // self.block_size - spec.start // self.block_size
        self._failed_blocks.update(spec.block_ids[first:])

    def failed_blocks(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # ------------------------------------------------------------ save

    def save_layer(self, meta: CachesvcMetadata, layer_name: str, kv_layer: torch.Tensor) -> None:
        index = self.layers.get(layer_name)
        if index is None or not meta.saves or not self._ready():
            return
        assert self.layout is not None
        if not self.layout.readable:
            return
        if not self._saves:   # first layer of the step: one record per request to save
            self._saves = [_Save(s.first, s.hashes, torch.tensor(s.block_ids, dtype=torch.long,
                                                                 device=kv_layer.device)) for s in meta.saves]
        t0 = time.perf_counter()
        for save in self._saves:
            start = save.first * self.chunk // self.block_size
            k, v = self.layout.gather(kv_layer, save.blocks[start:])
            save.slabs[(Kind.K, index)] = k.to("cpu", non_blocking=False)
            save.slabs[(Kind.V, index)] = v.to("cpu", non_blocking=False)
        self._step_s["gather"] += time.perf_counter() - t0

    def finish_step(self) -> None:
        """End of the step: settle loads, then put this step's chunks (one batch)."""
        busy, loads = bool(self._loads or self._saves), len(self._loads)
        in_place = sum(isinstance(load.loader, HeldArenaLoader) for load in self._loads)
        self._finish_loads()
        self._put(self._saves)
        self._saves = []
        if busy:
            log.debug("cachesvc step", extra={"cachesvc_step_loads": loads, "cachesvc_step_in_place": in_place,
                                              "cachesvc_step_ms": {k: round(v * 1e3, 2) for k, v in
                                                                   self._step_s.items()}})
            self._step_s = dict.fromkeys(self._step_s, 0.0)

    def _put(self, saves: list[_Save]) -> None:
        """Every whole chunk of this step's saves, in one put (atomic per batch)."""
        t0 = time.perf_counter()
        entries = []
        for save in saves:
            if len(save.slabs) != 2 * self.family.num_layers:
                continue   # a layer never came by: store nothing of it
            for i, chunk_hash in enumerate(save.hashes):
                rows = slice(i * self.chunk, (i + 1) * self.chunk)
                entries.append(EntryData(chunk_hash, {key: slab[rows] for key, slab in save.slabs.items()}))
        if not entries:
            return
        try:
            self.client.put(self.identity.family_id, self.identity.model_id, entries, transport=self.config.transport)
        except CacheServiceError as exc:   # a full or absent cache: the engine serves on
            log.warning("cachesvc save of %d chunks failed: %s", len(entries), exc)
        self._step_s["put"] += time.perf_counter() - t0

    def _release(self, lease_id: str) -> None:
        if lease_id:
            try:
                self.client.unpin(lease_id)
            except CacheServiceError:
                pass
