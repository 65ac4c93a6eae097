"""Fit the engine-neutral cost model (reuse.cost.CostModel) to a HuggingFace stack on
this host: one decoder layer timed at several sizes, with and without a past, scaled to a
whole forward, plus the head and ``generate()``'s fixed cost."""

from __future__ import annotations

import time

import numpy as np
import torch

from cachesvc.wire.keys import FamilySpec, Kind
from cachesvc_connectors.reuse.cost import CostModel


@torch.no_grad()
def calibrate(stack, family: FamilySpec, sizes: tuple[int, ...] = (16, 128, 512, 1024, 2048),
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
    cost = CostModel(c0, c1, c2, stack.num_layers, 0.0, family.slab_bytes(Kind.K, 1),
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
