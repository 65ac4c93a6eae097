"""CacheBlend-style selective token recompute: the baseline DroidSpeak is compared with.

CacheBlend (Yao et al., EuroSys 2025) reuses K/V computed in another context and repairs
them by recomputing, at each layer, only the tokens whose K/V deviate most from what a
full prefill would give. Applied across models, as the DroidSpeak paper does:

- layer 0 runs over every token from the consumer's own embeddings; comparing its K/V
  with the producer's layer 0 picks the candidates, the ``2·ratio`` of the cached tokens
  that deviate most (L2 norm of the K and V differences, over heads);
- layer 1 recomputes the candidates against the producer's K/V for every other token,
  and keeps the ``ratio`` of the cached tokens that deviate most there (CacheBlend's
  gradual filtering: deviation at one layer predicts it at the next);
- layers 2.. recompute that set; every other cached token keeps the producer's K/V.

The uncached suffix is always computed. Loads: the producer's K/V of every layer (what
full reuse loads; no E). Compute: one layer over all tokens, then about ``ratio`` of them
through the others, each query attending to every token (``CostModel.predict_blend``).
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from cachesvc.wire.keys import Kind
from cachesvc_connectors.hf.consumer import Consumer, head_major
from cachesvc_connectors.hf.loader import SlabLoader
from cachesvc_connectors.hf.selective import deviation, select
from cachesvc_connectors.reuse import Choice, Plan, blend_shares


class BlendConsumer(Consumer):
    """A consumer that reuses every layer's K/V of any producer (the full-reuse load) and
    repairs them by selective token recompute at ``ratio`` (0.15: CacheBlend's default).
    A baseline for benchmarks: it blends every hit it reuses, same-model ones included."""

    def __init__(self, *args, ratio: float = 0.15, **kwargs) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio is a share of the cached tokens, in [0, 1]; got {ratio}")
        super().__init__(*args, **kwargs)
        self.ratio = ratio

    def describe(self) -> str:
        return f"cacheblend {self.ratio:.0%}"

    def plan_for(self, producer: str, cached_tokens: int = 0, prompt_tokens: int = 0) -> Choice:
        return Choice(Plan.full_reuse(self.stack.num_layers), source="blend")

    def _reuse(self, ids, hit, plan, report):
        cache = super()._reuse(ids, hit, plan, report)
        if cache is not None:
            report.plan = self.describe()
        return cache

    def _assemble(self, ids: list[int], n: int, plan: Plan, loader: SlabLoader) -> DynamicCache | None:
        stack, dtype = self.stack, self.stack.dtype
        total = len(ids) - 1
        keep = [math.ceil(share * n) for share in blend_shares(self.ratio)]   # chosen after layers 0, 1
        cache = DynamicCache()
        hidden = stack.run(stack.embed(stack.ids(ids[:-1])), 0, 1, 0, cache)
        positions = torch.arange(total, device=stack.device)
        for layer in range(stack.num_layers):
            keys, values = loader.wait(Kind.K, layer), loader.wait(Kind.V, layer)
            if keys is None or values is None:
                return None
            old_keys, old_values = head_major(keys[:n], dtype), head_major(values[:n], dtype)
            if layer > 0:
                full_keys = old_keys.new_empty(*old_keys.shape[:2], total, old_keys.shape[3])
                full_values = torch.empty_like(full_keys)
                full_keys[:, :, :n], full_values[:, :, :n] = old_keys, old_values
                if len(positions):
                    hidden = stack.run_at(hidden, layer, positions, full_keys, full_values)
                cache.update(full_keys, full_values, layer)
            if layer < len(keep):
                # The layer's own K/V of the cached tokens computed here, against the producer's.
                cached = positions[positions < n]
                new_keys, new_values = cache.layers[layer].keys, cache.layers[layer].values
                scores = deviation(new_keys[:, :, cached], new_values[:, :, cached],
                                   old_keys[:, :, cached], old_values[:, :, cached])
                chosen = select(positions, scores, n, keep[layer])
                positions, hidden = positions[chosen], hidden[:, chosen]
        return cache
