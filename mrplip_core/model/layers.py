"""Transformer building blocks of the multimodal modules (pre-LayerNorm).

Masks are boolean with True = may attend, broadcastable to (B, Lq, Lk); attention runs
through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """(B, Lq, dim) queries, (B, Lk, dim) context (default x), mask (B, Lq|1, Lk) -> (B, Lq, dim)."""
        context = x if context is None else context
        b, lq, dim = x.shape
        lk = context.shape[1]
        q = self.q(x).view(b, lq, self.heads, dim // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(b, lk, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(out.transpose(1, 2).reshape(b, lq, dim))


class Block(nn.Module):
    """Pre-LN block: [self-attention] -> [cross-attention to a context] -> MLP."""

    def __init__(
        self, dim: int, heads: int, *, self_attention: bool = True, cross_attention: bool = True,
        mlp_ratio: float = 4.0, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout) if self_attention else None
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.cross_attn = Attention(dim, heads, dropout) if cross_attention else None
        self.norm_cross = nn.LayerNorm(dim) if cross_attention else None
        hidden = int(dim * mlp_ratio)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, self_mask: Tensor | None = None, context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        if self.self_attn is not None:
            x = x + self.drop(self.self_attn(self.norm_self(x), mask=self_mask))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block cross-attends: give a context")
            x = x + self.drop(self.cross_attn(self.norm_cross(x), context=context, mask=context_mask))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class CrossEncoder(nn.Module):
    """A stack of :class:`Block` with a final LayerNorm."""

    def __init__(self, dim: int, heads: int, layers: int, *, self_attention: bool = True,
                 cross_attention: bool = True, mlp_ratio: float = 4.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, self_attention=self_attention, cross_attention=cross_attention,
                  mlp_ratio=mlp_ratio, dropout=dropout)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None, self_mask: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, self_mask=self_mask, context=context, context_mask=context_mask)
        return self.norm(x)


def prefix_lm_attention_mask(prefix_lengths: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L, L) bool, True where query t may attend to key s.

    A query attends to every real prefix token and causally (``s <= t``) to the suffix;
    padding keys are never attended. For the text decoder of the PLM branch
    (prefix lengths from :func:`mrplip_core.data.lm_inputs.make_prefix_lm_batch`).
    """
    length = attention_mask.shape[1]
    positions = torch.arange(length, device=attention_mask.device)
    key_in_prefix = positions[None, None, :] < prefix_lengths[:, None, None]
    causal = positions[None, None, :] <= positions[None, :, None]
    return (key_in_prefix | causal) & attention_mask.bool()[:, None, :]
