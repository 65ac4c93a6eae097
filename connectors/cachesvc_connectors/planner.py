"""SLO-aware plan choice: the best-quality plan whose predicted TTFT meets a target.

Cost model (seconds; n cached context tokens, s uncached suffix tokens before the last
prompt token, L layers):

- a decoder layer over q new tokens attending to p cached ones costs
  ``layer_s(q, p) = c0 + c1·q + c·q·(p + q)`` (fixed overhead, the projections and MLP
  linear in q, attention in q·(p+q)), with ``c = c2`` for causal attention from position
  0 (sdpa's fused causal kernel) and ``c = c3`` with a past (an explicit mask, a slower
  kernel: 1.5–2× on this host). c0, c1, c2 are fitted by least squares to timings of the
  consumer's own layer on this host from position 0, then c3 to the timings with a past;
  then all four are scaled by one factor so that a forward through every layer at one
  size takes what it measurably takes (a layer timed alone is not a layer among others:
  caches, allocator) (:meth:`CostModel.calibrate`);
- every request pays ``request_s`` (``generate()``'s own setup, measured on a short
  prompt) and ends with ``head_s`` (the final norm and LM head on one position);
- loading moves ``bytes(plan, n)`` = n · (2·reused layers·K-or-V bytes per token +
  groups·E bytes per token) at ``bandwidth_Bps``, after ``fetch_overhead_s`` (lookup,
  descriptor, first frame); the consumer measures its loads and keeps an exponential
  average of the bandwidth it actually got (:meth:`CostModel.observe_load`);
- compute for a plan: every group layer over n+s tokens from scratch, every reused layer
  over the s suffix tokens attending to n, then the last prompt token through every layer
  attending to n+s (``generate()`` runs it);
- loading is pipelined under compute, but the consumer's own work on what arrives
  (conversion into its cache) is not: ``copy_s_per_byte``;
- so ``TTFT ≈ request + fetch_overhead + max(load, compute) + bytes·copy + last token +
  head``; a full prefill is ``request + L·layer_s(N, 0) + head`` for an N-token prompt.
  The fixed and per-byte terms are fitted to a measured prefill and two measured full
  reuses (:meth:`CostModel.fit_fixed_costs`), where a benchmark or a deployment has them.

The planner chooses among the profile's frontier plans and the full prefill (quality 1 by
definition): the highest quality whose predicted TTFT meets the target; ties go to the
faster. When nothing meets the target it takes the fastest and says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from cachesvc.keys import FamilySpec, Kind
from cachesvc_connectors.plan import Plan, blend_shares


@dataclass
class CostModel:
    c0: float                        # s per layer call
    c1: float                        # s per new token per layer
    c2: float                        # s per (new token × attended token) per layer, from position 0
    num_layers: int
    head_s: float                    # final norm + LM head on one position
    kv_bytes_per_token: int          # one K (or V) slab row of one layer
    e_bytes_per_token: int           # one E row
    bandwidth_Bps: float = 2e9
    fetch_overhead_s: float = 0.005
    c3: float | None = None          # the same with a past (None: c2)
    request_s: float = 0.0           # fixed per request: generate()'s setup
    copy_s_per_byte: float = 0.0     # the consumer's own work per loaded byte, not overlapped
    layer_scale: float = 1.0         # whole forward / layers timed alone (applied to c0..c3)

    def layer_s(self, q: int, past: int) -> float:
        attention = self.c2 if past == 0 or self.c3 is None else self.c3
        return self.c0 + self.c1 * q + attention * q * (past + q)

    def load_bytes(self, plan: Plan, n: int) -> int:
        reused = plan.num_layers - plan.recomputed_layers
        return n * (2 * reused * self.kv_bytes_per_token + len(plan.groups) * self.e_bytes_per_token)

    def prefill_s(self, tokens: int) -> float:
        """A full prefill of a ``tokens``-token prompt to its first token."""
        return self.request_s + self.num_layers * self.layer_s(tokens, 0) + self.head_s

    def _finish_s(self, cached: int) -> float:
        """The last prompt token through every layer after ``cached`` tokens, and the head."""
        return self.num_layers * self.layer_s(1, cached) + self.head_s

    def predict(self, plan: Plan, n: int, s: int) -> float:
        """Predicted TTFT of reusing n cached tokens under ``plan`` with s suffix tokens."""
        compute = plan.recomputed_layers * self.layer_s(n + s, 0)
        compute += (plan.num_layers - plan.recomputed_layers) * (self.layer_s(s, n) if s else 0.0)
        return self._reuse_ttft(compute, self.load_bytes(plan, n), n + s)

    def predict_blend(self, ratio: float, n: int, s: int) -> float:
        """Predicted TTFT of CacheBlend-style selective recompute (hf/blend.py): layer 0
        over all n+s tokens, layer 1 over 2·ratio of the cached ones, the other layers
        over ratio of them (and the suffix), each attending to all n+s under a mask; the
        load is full reuse's."""
        total, masked = n + s, self.c3 if self.c3 is not None else self.c2
        first, rest = blend_shares(ratio)

        def layer(q: int) -> float:
            return self.c0 + self.c1 * q + masked * q * total
        compute = self.layer_s(total, 0) + layer(math.ceil(first * n) + s)
        compute += (self.num_layers - 2) * layer(math.ceil(rest * n) + s)
        return self._reuse_ttft(compute, self.load_bytes(Plan.full_reuse(self.num_layers), n), total)

    def _reuse_ttft(self, compute_s: float, nbytes: int, cached: int) -> float:
        """TTFT of a reuse that computes for ``compute_s`` while ``nbytes`` load under it,
        leaving ``cached`` tokens for ``generate()``'s last prompt token."""
        return self.request_s + self.fetch_overhead_s + max(nbytes / self.bandwidth_Bps, compute_s) + \
            nbytes * self.copy_s_per_byte + self._finish_s(cached)

    def fit_fixed_costs(self, prefill: tuple[int, float], reuse: tuple[int, int, float],
                        larger_reuse: tuple[int, int, float] | None = None) -> None:
        """Fit what the layer model leaves unexplained to measured requests: a full
        prefill of N tokens that took t (``(N, t)``) gives ``request_s`` (``generate()``'s
        setup); full reuses of n cached and s suffix tokens that took t' (``(n, s, t')``)
        give ``fetch_overhead_s`` (the lookup, the loader's start, the per-layer
        assembly: 60–80 ms on a GPU host, where the layers take a few), and with a second,
        larger one, ``copy_s_per_byte`` (the consumer's own work on each loaded byte,
        which on a 2-core host does not overlap compute)."""
        tokens, took = prefill
        self.request_s = max(took - (self.prefill_s(tokens) - self.request_s), 0.0)
        self.fetch_overhead_s = self.copy_s_per_byte = 0.0
        full = Plan.full_reuse(self.num_layers)

        def unexplained(n: int, s: int, took: float) -> tuple[float, int]:
            return took - self.predict(full, n, s), self.load_bytes(full, n)
        small, small_bytes = unexplained(*reuse)
        if larger_reuse is not None:
            large, large_bytes = unexplained(*larger_reuse)
            if large_bytes > small_bytes:
                self.copy_s_per_byte = max((large - small) / (large_bytes - small_bytes), 0.0)
        self.fetch_overhead_s = max(small - small_bytes * self.copy_s_per_byte, 0.0)

    def observe_load(self, nbytes: int, seconds: float, weight: float = 0.2) -> None:
        """Fold a measured load into the bandwidth estimate (exponential average)."""
        if nbytes > 0 and seconds > 0:
            self.bandwidth_Bps = (1 - weight) * self.bandwidth_Bps + weight * nbytes / seconds

    @classmethod
    @torch.no_grad()
    def calibrate(cls, stack, family: FamilySpec, sizes: tuple[int, ...] = (16, 128, 512, 1024, 2048),
                  repeats: int = 2, bandwidth_Bps: float = 2e9, whole_tokens: int = 1024) -> CostModel:
        """Fit the layer model to timings of ``stack``'s layer 0 on this host, scale it to a
        forward through every layer over ``whole_tokens``, and time the head and
        ``generate()``'s fixed cost (a few seconds on a CPU)."""
        from transformers import DynamicCache
        hidden_size, device, dtype = stack.config.hidden_size, stack.device, stack.dtype

        def timed(fn) -> float:
            best = float("inf")
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            return best

        rows: list[tuple[int, int, float]] = []   # (q, past, seconds)
        for past in (0, max(sizes)):
            cache = DynamicCache()
            if past:
                stack.run(torch.zeros(1, past, hidden_size, dtype=dtype, device=device), 0, 1, 0, cache)
            for q in sizes:
                x = torch.randn(1, q, hidden_size, dtype=dtype, device=device)

                def one_layer(x=x, past=past, cache=cache):
                    trial = DynamicCache()
                    if past:
                        trial.update(cache.layers[0].keys, cache.layers[0].values, 0)
                    stack.run(x, 0, 1, past, trial)
                rows.append((q, past, timed(one_layer)))
        fresh = [(q, t) for q, past, t in rows if past == 0]
        coef, *_ = np.linalg.lstsq(np.asarray([[1.0, q, q * q] for q, _ in fresh]),
                                   np.asarray([t for _, t in fresh]), rcond=None)
        c0, c1, c2 = (max(float(c), 0.0) for c in coef)
        # c3 from the timings with a past, what c0 and c1 leave (least squares through 0).
        with_past = [(q * (past + q), t - c0 - c1 * q) for q, past, t in rows if past]
        c3 = max(sum(x * r for x, r in with_past) / sum(x * x for x, _ in with_past), 0.0)
        item = family.dtype.itemsize
        cost = cls(c0, c1, c2, stack.num_layers, 0.0, family.slab_bytes(Kind.K, 1),
                   family.hidden_size * item, bandwidth_Bps, c3=c3)
        x = torch.randn(1, whole_tokens, hidden_size, dtype=dtype, device=device)
        whole = timed(lambda: stack.run(x, 0, stack.num_layers, 0, DynamicCache()))
        factor = whole / (stack.num_layers * cost.layer_s(whole_tokens, 0))
        cost.c0, cost.c1, cost.c2, cost.c3 = (c * factor for c in (c0, c1, c2, c3))
        cost.layer_scale = factor
        cost.head_s = timed(lambda: stack.logits(x[:, :1]))
        ids = stack.ids(range(16))
        generate = timed(lambda: stack.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                      max_new_tokens=1, do_sample=False, pad_token_id=0))
        cost.request_s = max(generate - cost.prefill_s(16), 0.0)
        return cost


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True, slots=True)
class Choice:
    plan: Plan | None         # None: full prefill
    quality: float
    predicted_ttft_s: float
    meets_target: bool
    why: str


def choose(frontier: list[tuple[Plan, float]], cost: CostModel, n: int, s: int,
           ttft_target_s: float | None) -> Choice:
    """Among the (plan, quality) pairs (already held to the caller's minimum quality) and
    the full prefill: with a target, the best quality predicted to meet it, ties to the
    faster, or the fastest of all when none does; without one, the fastest plan."""
    options = [(None, 1.0, cost.prefill_s(n + s + 1))]
    options += [(plan, quality, cost.predict(plan, n, s)) for plan, quality in frontier]
    if ttft_target_s is None:
        plan, quality, ttft = min(options[1:] or options, key=lambda o: (o[2], -o[1]))
        return Choice(plan, quality, ttft, True, "no target: fastest profiled plan")
    meeting = [o for o in options if o[2] <= ttft_target_s]
    if meeting:
        plan, quality, ttft = max(meeting, key=lambda o: (o[1], -o[2]))
        return Choice(plan, quality, ttft, True, f"best quality within {ttft_target_s * 1e3:.0f} ms")
    plan, quality, ttft = min(options, key=lambda o: o[2])
    return Choice(plan, quality, ttft, False,
                  f"nothing meets {ttft_target_s * 1e3:.0f} ms; fastest predicted {ttft * 1e3:.0f} ms")
