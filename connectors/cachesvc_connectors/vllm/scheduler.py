"""Scheduler side of the vLLM connector: how many tokens of a new request the cache
holds, and what each step loads and saves.

Matching is one batched lookup per request (``CacheClient.lookup_prompt``: the chain of
its chunks with its extra keys, partial chunks included, located on the node's host),
with a lease that holds the entries until the worker has loaded them. A hit is used as
a token count valid in every layer, which is all vLLM's API can take:

- this model's own entries, whoever wrote them (this engine, another vLLM, the HF
  connector) as long as the weights digest is the same;
- another model's (``cachesvc.producers``) only when the pair's profile says full reuse
  (no layer recomputed) reaches ``cachesvc.min_quality``: the engine-neutral
  ``reuse.PlanSelector`` decides, as for the HF connector.

The answer is cut to a whole number of blocks and leaves the last prompt token to
compute. Saving: every whole chunk of the prompt that the hit did not cover, in the step
whose computation completes it; never a partial chunk, never more than vLLM lets a
request publish (``num_publishable_block_hashes``, where the engine has it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from cachesvc.wire.keys import ModelId
from cachesvc_client import CacheClient, CacheServiceError, Hit
from cachesvc_connectors.reuse import PlanPolicy, PlanSelector
from cachesvc_connectors.vllm.identity import ConnectorConfig, EngineIdentity, extra_keys
from cachesvc_connectors.vllm.meta import CachesvcMetadata, LoadSpec, SaveSpec

log = logging.getLogger(__name__)

LEASE_S = 60
"""How long a lookup holds its hit for the worker (a request dropped before loading
lets go of it by then)."""


@dataclass
class _Tracked:
    """A request the connector may load into or save from."""

    hashes: list[bytes]              # its whole chunks' hashes
    saved: int                       # leading chunks stored already (or not ours to store)
    savable: int                     # whole chunks it may store
    block_ids: list[int] = field(default_factory=list)
    load: LoadSpec | None = None     # pending until its blocks are allocated


class SchedulerSide:
    def __init__(self, client: CacheClient, identity: EngineIdentity, config: ConnectorConfig,
                 block_size: int) -> None:
        self.client, self.identity, self.config = client, identity, config
        self.block_size = block_size
        self.chunk = client.chunk_size()
        if self.chunk % block_size:
            raise ValueError(f"the cachesvc node's chunk size ({self.chunk} tokens) is not a multiple of vLLM's "
                             f"block size ({block_size}): start vLLM with a block size dividing it, or the node "
                             f"with --chunk-size a multiple of {block_size}")
        client.register_model(identity.model_id, identity.weights_digest, identity.family)
        self.selector = PlanSelector(client, identity.model_id, PlanPolicy(min_quality=config.min_quality))
        self._reqs: dict[str, _Tracked] = {}

    # ------------------------------------------------------------ matching

    def matched_tokens(self, request, num_computed: int) -> int:
        """Tokens beyond ``num_computed`` the cache can fill (block-aligned)."""
        t0 = time.perf_counter()
        leased_at = time.time()
        self._drop_pending(request.request_id)
        tokens = list(request.prompt_token_ids or ())
        extra = extra_keys(request)
        fid = self.identity.family_id
        # At most whole blocks, the last prompt token left to compute. Where vLLM's own
        # prefix cache already holds all of them, the lookup only tells which chunks are
        # stored (for saves): no lease to take and end again on each local hit.
        loadable = (len(tokens) - 1) // self.block_size * self.block_size
        lease = LEASE_S if self.config.load and num_computed < loadable else 0
        try:
            chain = self.client.hash_tokens(tokens, fid, extra_keys=extra, include_partial=True)
            result = self.client.lookup_prompt(
                fid, tokens, consumer=self.identity.model_id, producers=[self.identity.model_id, *self.config.producers],
                extra_keys=extra, lease_ttl_s=lease, locate=True, hashes=chain)
        except CacheServiceError as exc:   # the cache is down: prefill as without it
            log.warning("cachesvc lookup failed; prefilling: %s", exc)
            return 0
        log.debug("cachesvc lookup", extra={"cachesvc_lookup_ms": round((time.perf_counter() - t0) * 1e3, 2)})
        hashes = chain[:len(tokens) // self.chunk]   # the whole chunks (a partial one is never saved)
        hit = self._usable(result.hits) if self.config.load else None
        usable = min(hit.num_tokens // self.block_size * self.block_size, loadable) if hit else 0
        # Whole chunks of the hit: stored already (this model's), or not this model's to store.
        covered = sum(1 for lay in hit.layouts if lay.num_tokens == self.chunk) if hit else 0
        savable = len(hashes)
        publishable = getattr(request, "num_publishable_block_hashes", None)
        if publishable is not None:
            savable = min(savable, publishable * self.block_size // self.chunk)
        tracked = _Tracked(hashes, saved=covered, savable=savable if self.config.save else 0)
        self._reqs[request.request_id] = tracked
        new = usable - num_computed
        if new <= 0:
            self._release(result.lease_id)
            return 0
        cut = hit[:-(-usable // self.chunk)]   # the entries covering the loaded tokens
        tracked.load = LoadSpec(request.request_id, cut, num_computed, usable, (), result.lease_id,
                                leased_at + LEASE_S if result.lease_id else 0.0)
        return new

    def _usable(self, hits: list[Hit]) -> Hit | None:
        """This model's own hit, else the longest other producer's that full reuse
        suits (its profile's plan recomputes no layer)."""
        own = next((h for h in hits if h.same_model), None)
        if own is not None:
            return own
        for hit in hits:   # longest first
            choice = self.selector.choose(ModelId(hit.producer))
            if choice.plan is not None and not choice.plan.groups:
                return hit
        return None

    # ------------------------------------------------------------ allocation and steps

    def after_alloc(self, request, num_external_tokens: int) -> None:
        tracked = self._reqs.get(request.request_id)
        if tracked is not None and tracked.load is not None and num_external_tokens == 0:
            self._drop_pending(request.request_id)   # vLLM chose not to load after all

    def build_meta(self, scheduler_output) -> CachesvcMetadata:
        meta = CachesvcMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._reqs.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                done = new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id]
                self._step(meta, new.req_id, tracked, done)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._reqs.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids:   # after preemption: all of its blocks anew
                    tracked.block_ids = list(new_blocks[0])
                else:
                    tracked.block_ids += new_blocks[0]
            done = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id]
            self._step(meta, req_id, tracked, done)
        return meta

    def _step(self, meta: CachesvcMetadata, req_id: str, tracked: _Tracked, done: int) -> None:
        """This step's load (if pending) and the chunks its computation completes."""
        bs = self.block_size
        if tracked.load is not None:
            spec = tracked.load
            blocks = tuple(tracked.block_ids[spec.start // bs:spec.stop // bs])
            meta.loads.append(replace(spec, block_ids=blocks))
            tracked.load = None
        end = min(done // self.chunk, tracked.savable)
        if end > tracked.saved:
            first = tracked.saved
            need = end * self.chunk // bs
            meta.saves.append(SaveSpec(req_id, first, tuple(tracked.hashes[first:end]),
                                       tuple(tracked.block_ids[:need])))
            tracked.saved = end

    def finished(self, request) -> None:
        self._drop_pending(request.request_id)
        self._reqs.pop(request.request_id, None)

    # ------------------------------------------------------------ leases

    def _drop_pending(self, req_id: str) -> None:
        tracked = self._reqs.get(req_id)
        if tracked is not None and tracked.load is not None:
            self._release(tracked.load.lease_id)
            tracked.load = None

    def _release(self, lease_id: str) -> None:
        if lease_id:
            try:
                self.client.unpin(lease_id)
            except CacheServiceError:
                pass   # expired, or the node is gone: the lease ends by itself
