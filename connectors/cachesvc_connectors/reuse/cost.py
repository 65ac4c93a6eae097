"""The planner's cost model: predicted TTFT of a reuse plan or a full prefill (no torch;
an engine's connector fits it on its host, e.g. ``cachesvc_connectors.hf.calibrate``).

Cost model (seconds; n cached context tokens, s uncached suffix tokens before the last
prompt token, L layers):

- a decoder layer over q new tokens attending to p cached ones costs
  ``layer_s(q, p) = c0 + c1·q + c·q·(p + q)`` (fixed overhead, the projections and MLP
  linear in q, attention in q·(p+q)), with ``c = c2`` for causal attention from position
  0 (sdpa's fused causal kernel) and ``c = c3`` with a past (the HF connector's split
  attention, hf/attention.py; one masked call before it was 1.5–2× slower on this host,
  and engines differ, so it is fitted, not assumed). c0, c1, c2 are fitted by least
  squares to timings of the consumer's own layer on this host from position 0, then c3 to the timings with a past;
  then all four are scaled by one factor so that a forward through every layer at one
  size takes what it measurably takes (a layer timed alone is not a layer among others:
  caches, allocator) (``cachesvc_connectors.hf.calibrate``);
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
  reuses (:meth:`CostModel.fit_fixed_costs`), where a benchmark or a deployment has them,
  and then keep learning from the consumer's own requests (:meth:`CostModel.observe_reuse`:
  a least-squares line through what each reuse took beyond its load and compute, with
  older requests weighing less), so a deployment's predictions follow its own traffic.

The planner (reuse.planner) chooses with these predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cachesvc_connectors.reuse.plan import Plan, blend_shares


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
    learned: "FixedCostFit | None" = None   # online fit of fetch_overhead_s and copy_s_per_byte

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
        """Predicted TTFT of CacheBlend-style selective recompute (cachesvc_lab.blend): layer 0
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

    def observe_reuse(self, plan: Plan, n: int, s: int, took_s: float) -> None:
        """Learn from one reuse that took ``took_s`` from the lookup to a cache of its n
        cached and s suffix tokens (the consumer's ``prefill_s``): what load and compute
        do not explain is ``fetch_overhead_s + bytes·copy_s_per_byte``, refitted over the
        recent requests once there are ``FixedCostFit.MIN_REQUESTS`` of them."""
        compute = plan.recomputed_layers * self.layer_s(n + s, 0)
        compute += (plan.num_layers - plan.recomputed_layers) * (self.layer_s(s, n) if s else 0.0)
        nbytes = self.load_bytes(plan, n)
        if self.learned is None:
            self.learned = FixedCostFit()
        self.learned.add(nbytes, took_s - max(nbytes / self.bandwidth_Bps, compute))
        fitted = self.learned.fit()
        if fitted is not None:
            self.fetch_overhead_s, self.copy_s_per_byte = fitted

    def observe_load(self, nbytes: int, seconds: float, weight: float = 0.2) -> None:
        """Fold a measured load into the bandwidth estimate (exponential average)."""
        if nbytes > 0 and seconds > 0:
            self.bandwidth_Bps = (1 - weight) * self.bandwidth_Bps + weight * nbytes / seconds


@dataclass
class FixedCostFit:
    """Least squares of ``unexplained ≈ a + b·bytes`` over requests, each older one
    weighing (1 - ``forget``) times less: exponentially weighted sums of 1, x, y, x², xy."""

    MIN_REQUESTS = 3
    forget: float = 0.1
    requests: int = 0
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def add(self, nbytes: int, unexplained_s: float) -> None:
        keep = 1.0 - self.forget
        x, y = float(nbytes), unexplained_s
        self._w, self._x, self._y = keep * self._w + 1, keep * self._x + x, keep * self._y + y
        self._xx, self._xy = keep * self._xx + x * x, keep * self._xy + x * y
        self.requests += 1

    def fit(self) -> tuple[float, float] | None:
        """(a, b) in seconds and seconds per byte, both ≥ 0; None before MIN_REQUESTS.
        With loads of one size only, b is 0 and a their mean."""
        if self.requests < self.MIN_REQUESTS:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        spread = self._xx / self._w - mean_x * mean_x
        slope = (self._xy / self._w - mean_x * mean_y) / spread if spread > 1e-9 * max(mean_x * mean_x, 1.0) else 0.0
        slope = max(slope, 0.0)
        return max(mean_y - slope * mean_x, 0.0), slope
