"""Selective token recompute (CacheBlend): which reused tokens to recompute. Shared by the
cross-model baseline (cachesvc_lab.blend) and the cross-context ``blend`` strategy
(hf.agents)."""

from __future__ import annotations

import torch


def deviation(new_keys: torch.Tensor, new_values: torch.Tensor, old_keys: torch.Tensor,
              old_values: torch.Tensor) -> torch.Tensor:
    """Per token ([tokens]): ‖ΔK‖ + ‖ΔV‖ over heads and head dims, in fp32; inputs are
    ``[1, kv_heads, tokens, head_dim]``."""
    def norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.float() - b.float()).square().sum(dim=(0, 1, 3)).sqrt()
    return norm(new_keys, old_keys) + norm(new_values, old_values)


def select(positions: torch.Tensor, scores: torch.Tensor, n: int, count: int) -> torch.Tensor:
    """Indices into ``positions`` (sorted) to keep: the ``count`` cached positions (< n)
    with the highest scores, and every suffix position (≥ n), in position order.
    ``scores`` covers the cached positions, aligned with the first entries of ``positions``."""
    cached = int((positions < n).sum())
    top = torch.topk(scores[:cached], min(count, cached)).indices
    suffix = torch.arange(cached, len(positions), device=positions.device)
    return torch.cat([top.sort().values, suffix])
