"""Attention for tokens computed after reused keys, split where the mask has structure.

When the connector computes tokens behind a cache it assembled (the uncached suffix of
a prefix hit, the template text of an agent prompt, a recompute group), each query sees
every key before the first computed position and, after it, keys up to its own
position. One SDPA call over all keys needs an explicit mask for that, and an explicit
mask takes SDPA's masked kernel on the CPU, which computes every query × key block: at
1000 tokens with 200 reused it was 1.4× slower than the split below, at 4096 tokens with
100 reused 2.3× (measured on this project's 2-core VM, 9 heads of 64).

The split: keys ``[0, visible)`` through SDPA's flash kernel without a mask, keys
``[visible, kv)`` causally (no mask either, when the computed tokens are exactly those
keys) or through the mask's remaining columns, and the two partial results merged by
their log-sum-exp. This equals one masked SDPA to fp32 rounding (tested).

It runs as an attention implementation registered with transformers
(:data:`SPLIT_SDPA`): transformers' own ``sdpa_attention_forward`` whenever the caller
passes no ``visible_keys`` (``generate()``, the model's own forward), the split only when
:class:`~cachesvc_connectors.hf.decoder.DecoderStack` asks for it. The flash kernel that
returns the log-sum-exp is the CPU one; on other devices the split falls back to one
masked SDPA (their masked kernels do not compute the masked blocks' cost the same way,
and that path is what ran before).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SPLIT_SDPA = "cachesvc_sdpa"


def split_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    visible_keys: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; shapes (batch, heads, tokens, head_dim)
    in, (batch, tokens, heads, head_dim) out. With ``visible_keys`` = v (0 < v < keys):
    every query sees keys [0, v); ``attention_mask`` (bool, [.., q, keys - v]) says which
    of the rest it sees, or None for causal over them (then q == keys - v)."""
    kv_len = key.shape[2]
    if visible_keys is None or not 0 < visible_keys < kv_len or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    causal = attention_mask is None
    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, _whole(attention_mask, query, visible_keys),
                                      scaling=scaling, **kwargs)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu   # (out, logsumexp); GQA as is
    past, past_lse = flash(query, key[:, :, :visible_keys], value[:, :, :visible_keys], 0.0, False,
                           scale=scaling)[:2]
    bias = None
    if not causal:   # the kernel takes an additive mask of the query's dtype only
        bias = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        bias.masked_fill_(~attention_mask, float("-inf"))
    new, new_lse = flash(query, key[:, :, visible_keys:], value[:, :, visible_keys:], 0.0, causal,
                         attn_mask=bias, scale=scaling)[:2]
    # Every query sees its own key among the new ones, so new_lse is finite.
    top = torch.maximum(past_lse, new_lse)
    w_past, w_new = (past_lse - top).exp_().unsqueeze(-1), (new_lse - top).exp_().unsqueeze(-1)
    out = (past.float() * w_past + new.float() * w_new) / (w_past + w_new)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _whole(mask: torch.Tensor | None, query: torch.Tensor, visible: int) -> torch.Tensor:
    """The one [.., q, keys] bool mask the split stands for."""
    q = query.shape[2]
    if mask is None:
        mask = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()[None, None]
    seen = torch.ones(*mask.shape[:-1], visible, dtype=torch.bool, device=query.device)
    return torch.cat([seen, mask], -1)


AttentionInterface.register(SPLIT_SDPA, split_attention)
# generate() and the model's own forward build the masks they would build for sdpa.
ALL_MASK_ATTENTION_FUNCTIONS.register(SPLIT_SDPA, sdpa_mask)
