"""Run a decoder-only transformers model one layer at a time.

``DecoderStack`` exposes the pieces of a Llama-style model (embedding, decoder layers,
rotary embedding, final norm, LM head) so the consumer can run any layer range over any
token positions, with a cache it assembles itself. Running layers [a, b) from the hidden
state entering a is exact: the same operations as the model's own forward.

Masks are built here, not by transformers' helpers: those infer the past length from the
cache's first layer, which is wrong while a mixed cache is being assembled (some layers
hold the producer's prefix, others are still empty).

Two kinds of cache go through :meth:`DecoderStack.run`. The producer's is a plain
``DynamicCache()`` (no config), whose layers keep every token, also on sliding-window
layers: it stores every position, and the window is applied by the mask. The consumer's
is :meth:`DecoderStack.new_cache`, built from the model's config like the model's own
(a sliding layer keeps only its last ``window - 1`` tokens), so the uncached suffix
attends to what the model's own forward would, and decode after reuse costs what it
costs after the model's own prefill. The masks follow whichever the cache is: a sliding
layer's keys then start at ``kv_offset``, not at position 0.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from cachesvc_connectors.hf.attention import SPLIT_SDPA


class UnsupportedModelError(TypeError):
    """The model's decoder loop does not fit what the connector runs."""


class DecoderStack:
    """A causal LM's inner model, layer by layer. Invariants: ``layers[i].forward`` takes
    (hidden, attention_mask, position_embeddings, position_ids, past_key_values,
    use_cache) and returns the hidden state; one rotary embedding (or one per layer type)."""

    def __init__(self, model) -> None:
        inner = getattr(model, "model", None)
        missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb")
                   if inner is None or not hasattr(inner, name)]
        if missing or not hasattr(model, "lm_head"):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a decoder-only model the connector can run "
                f"layer by layer: missing {', '.join(missing or ['lm_head'])} (supported: "
                f"Llama, Qwen2, Mistral, Gemma 3 text, and models with the same decoder loop)")
        params = inspect.signature(type(inner.layers[0]).forward).parameters
        needed = ("hidden_states", "attention_mask", "position_embeddings", "past_key_values")
        absent = [p for p in needed if p not in params]
        if absent:
            raise UnsupportedModelError(f"{type(inner.layers[0]).__name__}.forward lacks "
                                        f"{', '.join(absent)}: its decoder loop differs")
        self.model = model
        self.inner = inner
        self.config = getattr(model.config, "text_config", None) or model.config
        self.layers = inner.layers
        self.num_layers = len(self.layers)
        self.layer_types = list(getattr(self.config, "layer_types", None) or
                                ["full_attention"] * self.num_layers)
        unknown = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            # Chunked or shared-KV layers cache and mask differently from what run() builds.
            raise UnsupportedModelError(f"layer types {', '.join(unknown)}: the connector runs full and "
                                        f"sliding-window attention layers only")
        self._rotary_by_type = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if impl not in ("sdpa", SPLIT_SDPA, "eager"):
            raise UnsupportedModelError(f"attention implementation {impl!r}: the connector "
                                        f"builds masks for 'sdpa' and 'eager'")
        if impl == "sdpa":
            # sdpa itself, plus the split for tokens computed after reused keys (attention.py);
            # generate() and the model's own forward run exactly what they ran.
            model.set_attn_implementation(SPLIT_SDPA)
        self._bool_masks = impl != "eager"
        self._memo: dict[tuple, tuple] = {}   # see _positional: its key -> (rotary, mask, split)

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the model's weights live: every tensor the stack builds goes there."""
        return self.inner.embed_tokens.weight.device

    def ids(self, token_ids) -> torch.Tensor:
        """``[1, n]`` token ids on the model's device."""
        return torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(input_ids)

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` in tokens, or None for full attention."""
        if getattr(self.config, "layer_types", None):
            if self.layer_types[layer] != "sliding_attention":
                return None
        elif getattr(self.config, "use_sliding_window", True) is False:
            return None
        return getattr(self.config, "sliding_window", None)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor, layer: int):
        if self._rotary_by_type:
            return self.inner.rotary_emb(hidden, positions, self.layer_types[layer])
        return self.inner.rotary_emb(hidden, positions)

    def new_cache(self):
        """An empty cache laid out as the model's own (sliding layers keep their last
        ``window - 1`` tokens): what the consumer assembles and ``generate()`` continues."""
        return DynamicCache(config=self.model.config)

    def mask(self, positions: torch.Tensor, kv_len: int, window: int | None, kv_offset: int = 0) -> torch.Tensor:
        """[1, 1, q, kv_len]: the query at absolute position ``positions[i]`` sees keys
        0..positions[i] (the last ``window`` of them with a sliding window); key j is the
        one at absolute position ``kv_offset + j``."""
        k = torch.arange(kv_offset, kv_offset + kv_len, device=self.device).unsqueeze(0)
        q = positions.unsqueeze(1)
        allowed = k <= q
        if window:
            allowed &= k > q - window
        allowed = allowed[None, None]
        if self._bool_masks:
            return allowed
        blocked = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return blocked.masked_fill(~allowed, torch.finfo(self.dtype).min)

    def run(self, hidden: torch.Tensor, start: int, stop: int, q_start: int, cache) -> torch.Tensor:
        """Run layers [start, stop) on ``hidden`` ([1, q, hidden]) for the tokens at
        positions q_start..q_start+q-1, appending their K/V to ``cache`` (which must hold
        exactly q_start tokens at each of these layers: all of them, or a sliding layer's
        last ``window - 1`` of :meth:`new_cache`)."""
        q_len = hidden.shape[1]
        positions = torch.arange(q_start, q_start + q_len, device=self.device).unsqueeze(0)
        for layer in range(start, stop):
            rotary, mask, split = self._positional(hidden, positions, q_start, layer, _kept(cache, layer, q_start))
            hidden = self.layers[layer](hidden, attention_mask=mask, position_embeddings=rotary,
                                        position_ids=positions, past_key_values=cache, use_cache=True, **split)
            if isinstance(hidden, tuple):   # older decoder layers return (hidden, ...)
                hidden = hidden[0]
        return hidden

    def run_at(self, hidden: torch.Tensor, layer: int, positions: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Run ``layer`` on ``hidden`` ([1, q, hidden]) for tokens at the sorted absolute
        ``positions`` ([q], any gaps) against a whole layer of K/V (``keys``/``values``
        [1, kv_heads, T, head_dim], positions 0..T-1): the layer's K/V of these tokens
        overwrite their rows in place before attention, and each query sees keys up to its
        own position. This is selective token recompute (CacheBlend); rows not in
        ``positions`` are whatever the caller put there (another model's K/V)."""
        kv_len, window = keys.shape[2], self.window(layer)
        split = {}
        if window is None and self._splits and (first := int(positions[0])) > 0:
            # Keys before the first computed token are seen by every query: split there.
            split = {"visible_keys": first}
            tail = len(positions) == kv_len - first       # sorted and unique: exactly [first, kv_len)
            mask = None if tail else self.mask(positions, kv_len - first, None, kv_offset=first)
        else:
            mask = self.mask(positions, kv_len, window)
        ids = positions.unsqueeze(0)
        hidden = self.layers[layer](hidden, attention_mask=mask, position_embeddings=self.rotary(hidden, ids, layer),
                                    position_ids=ids, past_key_values=_Overwrite(keys, values, positions),
                                    use_cache=True, **split)
        return hidden[0] if isinstance(hidden, tuple) else hidden

    @property
    def _splits(self) -> bool:
        """Whether attention is split after reused keys (attention.py): on the CPU, whose
        masked kernel the split avoids (elsewhere it would fall back to one masked call,
        and ``run_at`` would read a position back from the device each layer); asked at
        each call, since the model's implementation may have been switched since."""
        return self.device.type == "cpu" and getattr(self.config, "_attn_implementation", None) == SPLIT_SDPA

    def _positional(self, hidden: torch.Tensor, positions: torch.Tensor, q_start: int, layer: int, kept: int):
        """Rotary embeddings, mask and split for these positions at ``layer`` over ``kept``
        cached tokens, memoized: the consumer runs the same suffix through every reused
        layer one call at a time, and they depend only on the positions, the layer type,
        the window, how many past tokens the layer's cache returns and the implementation."""
        splits = self._splits
        key = (q_start, hidden.shape[1], self.layer_types[layer] if self._rotary_by_type else None,
               self.window(layer), kept, splits)
        if key not in self._memo:
            if len(self._memo) >= 16:
                self._memo.clear()
            q_len, window = hidden.shape[1], key[3]
            split = {}
            if self._bool_masks and q_start == 0 and (window is None or q_len <= window):
                # Plain causal attention from position 0: no mask, so sdpa runs causal
                # itself (its fused kernels take no explicit mask; 1.5x faster on 4096
                # tokens here). Not for eager, which masks only what it is given.
                mask = None
            elif splits and window is None and kept:
                # Every past key is seen by every query, the new ones causally: no mask either.
                mask, split = None, {"visible_keys": kept}
            else:
                mask = self.mask(positions[0], kept + q_len, window, q_start - kept)
            self._memo[key] = (self.rotary(hidden, positions, layer), mask, split)
        return self._memo[key]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the last position of ``hidden`` (the output of the last layer)."""
        return self.model.lm_head(self.inner.norm(hidden[:, -1:]))


def _kept(cache, layer: int, past: int) -> int:
    """How many of the ``past`` tokens before a query ``cache``'s ``layer`` hands back to
    attention: all of them, but a sliding-window layer's last ``window - 1`` (transformers'
    ``DynamicSlidingWindowLayer`` keeps those and returns them with the new tokens)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer >= len(layers) or not getattr(layers[layer], "is_sliding", False):
        return past
    return min(past, layers[layer].sliding_window - 1)


class _Overwrite:
    """The one cache method a decoder layer's attention calls (``update``), writing the
    new tokens' K/V into their rows of a full layer and returning the whole layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self.keys, self.values, self.positions = keys, values, positions

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[:, :, self.positions] = keys.to(self.keys.dtype)
        self.values[:, :, self.positions] = values.to(self.values.dtype)
        return self.keys, self.values
