"""Producer side: prefill a context and store its K, V and E per chunk.

For chunk c (tokens [c·C, (c+1)·C)) and layer l the producer stores K and V as the model
cached them (post-RoPE, token-major ``[tokens, kv_heads, head_dim]``) and E, the hidden
state *entering* layer l (``[tokens, hidden]``). Which kinds and layers are stored is
configurable: a deployment whose consumers recompute only a few groups can keep E only
at the likely transition layers (E is 1.5× a layer's K+V on SmolLM2).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cachesvc.wire.keys import DType, Kind, ModelId, parent_of
from cachesvc_client import CacheClient, EntryData
from cachesvc_connectors.hf.decoder import DecoderStack
from cachesvc_connectors.hf.family import register


@dataclass(frozen=True, slots=True)
class ProducerOptions:
    kinds: tuple[Kind, ...] = (Kind.K, Kind.V, Kind.E)
    kv_layers: tuple[int, ...] | None = None   # layers whose K/V are stored; None = all
    e_layers: tuple[int, ...] | None = None    # layers whose E is stored; None = all
    dtype: DType = DType.BFLOAT16              # slab dtype (part of the family)
    # Also store the trailing partial chunk: a consumer's prompt is this context plus its
    # question, so the shared text ends mid-chunk, and without it the consumer prefills
    # up to chunk_size - 1 context tokens through every layer (docs/chunk-keys.md).
    include_partial: bool = True
    transport: str | None = None               # data-plane path; None = the client's default
    # The weights digest to register under; None = the in-memory digest. Engines sharing one
    # cache (HF and vLLM) pass family.checkpoint_digest of the checkpoint both load.
    weights_digest: str | None = None


@dataclass(frozen=True, slots=True)
class StoreReport:
    prompt_tokens: int
    stored_tokens: int       # tokens covered by the chunks stored (or already present)
    chunks: int
    entries_committed: int
    already_present: int
    bytes_sent: int
    prefill_s: float
    put_s: float


class Producer:
    """Prefills prompts with ``model`` and stores their chunks as ``model_id``."""

    def __init__(self, client: CacheClient, model, tokenizer, model_id: ModelId,
                 options: ProducerOptions = ProducerOptions()) -> None:
        self.client, self.model, self.model_id, self.options = client, model, model_id, options
        self.stack = DecoderStack(model)
        self.registration = register(client, model, tokenizer, model_id, options.dtype, options.weights_digest)
        self.family_id = self.registration.family_id
        self._dtype = options.dtype.to_torch()

    @torch.no_grad()
    def store(self, input_ids: Sequence[int] | torch.Tensor) -> StoreReport:
        ids = [int(t) for t in (input_ids.reshape(-1).tolist() if torch.is_tensor(input_ids) else input_ids)]
        hashes = self.client.hash_tokens(ids, self.family_id, include_partial=self.options.include_partial)
        chunk = self.client.chunk_size()
        covered = min(len(ids), len(hashes) * chunk)
        if not hashes:
            return StoreReport(len(ids), 0, 0, 0, 0, 0, 0.0, 0.0)
        t0 = time.perf_counter()
        cache = DynamicCache()
        out = self.model.model(input_ids=self.stack.ids(ids[:covered]), past_key_values=cache,
                               use_cache=True, output_hidden_states=True)
        slabs = self._host_slabs(out.past_key_values, out.hidden_states)
        prefill_s = time.perf_counter() - t0
        # The trailing partial chunk names its parent, so lookups offer it to prompts that
        # continue past it in the same round trip (docs/chunk-keys.md).
        partial_parent = parent_of(hashes, len(hashes) - 1, self.client.options.tenant, self.family_id,
                                   chunk) if covered % chunk else b""
        entries = [EntryData(h, {key: slab[i * chunk:min((i + 1) * chunk, covered)]
                                 for key, slab in slabs.items()},
                             parent_hash=partial_parent if (i + 1) * chunk > covered else b"")
                   for i, h in enumerate(hashes)]
        t1 = time.perf_counter()
        put = self.client.put(self.family_id, self.model_id, entries, transport=self.options.transport)
        return StoreReport(len(ids), covered, len(hashes), put.entries_committed, put.already_present,
                           put.bytes_sent, prefill_s, time.perf_counter() - t1)

    def _host_slabs(self, cache, hidden_states) -> dict:
        """Token-major slabs over every covered token, in the family dtype, in host memory
        (one copy per layer and kind off the model's device; a chunk is a row slice of it,
        contiguous because the layout is token-major)."""
        opts, slabs = self.options, {}
        kv_layers = range(self.stack.num_layers) if opts.kv_layers is None else opts.kv_layers
        e_layers = range(self.stack.num_layers) if opts.e_layers is None else opts.e_layers
        for layer in kv_layers:
            keys, values = cache.layers[layer].keys, cache.layers[layer].values
            if Kind.K in opts.kinds:
                slabs[(Kind.K, layer)] = self._token_major(keys[0].transpose(0, 1))
            if Kind.V in opts.kinds:
                slabs[(Kind.V, layer)] = self._token_major(values[0].transpose(0, 1))
        if Kind.E in opts.kinds:
            for layer in e_layers:   # hidden_states[l] is the input of layer l (l < L)
                slabs[(Kind.E, layer)] = self._token_major(hidden_states[layer][0])
        return slabs

    def _token_major(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._dtype).contiguous().cpu()
