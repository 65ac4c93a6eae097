"""vLLM's paged KV blocks ⇄ token-major K/V slabs ``[tokens, kv_heads, head_dim]``.

Each attention backend lays a block out its own way; a :class:`PagedLayout` moves whole
blocks of tokens between the two. Known layouts:

- **cpu-vec** (vLLM's CPU backend, ISA ``vec``: fp32, or bf16 without AMX): a layer is
  ``[num_blocks, kv_heads, block_size, 2 * head_dim]``; per (block, head) the first half
  holds K *transposed*, ``[head_dim, block_size]``, the second V, ``[block_size, head_dim]``
  (measured against HF's K/V of the same prompt: exact);
- **flash** (vLLM's CUDA FlashAttention-style backends): ``[2, num_blocks, block_size,
  kv_heads, head_dim]``, K then V.

Other layouts (the CPU backend's AMX and vec16 packings, MLA) are refused by name: the
connector then neither loads nor saves, and vLLM prefills as without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedLayout(ValueError):
    """A KV cache layout this connector cannot read or write."""


@dataclass(frozen=True)
class PagedLayout:
    name: str
    block_size: int
    kv_heads: int
    head_dim: int

    def _views(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) views of a layer, indexed by block first: K ``[nb, H, D, bs]`` (cpu-vec)
        or ``[nb, bs, H, D]`` (flash), V ``[nb, H, bs, D]`` or ``[nb, bs, H, D]``."""
        bs, h, d = self.block_size, self.kv_heads, self.head_dim
        if self.name == "cpu-vec":
            halves = kv.view(kv.shape[0], h, 2, bs * d)
            return halves[:, :, 0].view(-1, h, d, bs), halves[:, :, 1].view(-1, h, bs, d)
        return kv[0], kv[1]

    def scatter(self, kv: torch.Tensor, blocks: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``/``v`` (``[len(blocks) * block_size, H, D]``) into ``blocks``."""
        kview, vview = self._views(kv)
        n, bs = len(blocks), self.block_size
        k, v = k.view(n, bs, self.kv_heads, self.head_dim), v.view(n, bs, self.kv_heads, self.head_dim)
        if self.name == "cpu-vec":
            kview[blocks] = k.permute(0, 2, 3, 1).to(kview.dtype)
            vview[blocks] = v.permute(0, 2, 1, 3).to(vview.dtype)
        else:
            kview[blocks] = k.to(kview.dtype)
            vview[blocks] = v.to(vview.dtype)

    def gather(self, kv: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V of ``blocks`` as ``[len(blocks) * block_size, H, D]`` (new tensors)."""
        kview, vview = self._views(kv)
        h, d = self.kv_heads, self.head_dim
        if self.name == "cpu-vec":
            k = kview[blocks].permute(0, 3, 1, 2)
            v = vview[blocks].permute(0, 2, 1, 3)
        else:
            k, v = kview[blocks], vview[blocks]
        return k.reshape(-1, h, d), v.reshape(-1, h, d)


def layout_of(kv: torch.Tensor, block_size: int, kv_heads: int, head_dim: int, isa: str | None) -> PagedLayout:
    """The layout of a layer's KV cache tensor; UnsupportedLayout naming what it is."""
    shape = tuple(kv.shape)
    if kv.device.type == "cpu":
        if shape[1:] != (kv_heads, block_size, 2 * head_dim):
            raise UnsupportedLayout(f"CPU KV cache of shape {shape}, expected [blocks, {kv_heads}, {block_size}, "
                                    f"{2 * head_dim}]")
        if isa not in (None, "vec"):
            raise UnsupportedLayout(f"vLLM's CPU attention ISA {isa!r} packs blocks in a layout this connector "
                                    "does not know (supported: vec; run fp32, or bf16 without AMX)")
        return PagedLayout("cpu-vec", block_size, kv_heads, head_dim)
    if len(shape) == 5 and shape[0] == 2 and shape[2:] == (block_size, kv_heads, head_dim):
        return PagedLayout("flash", block_size, kv_heads, head_dim)
    raise UnsupportedLayout(f"KV cache of shape {shape} on {kv.device.type}: not a layout this connector knows")
