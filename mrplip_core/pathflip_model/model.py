"""The PathFLIP model over a slide's patch features.

Shapes: B slides, P patches per slide (padded; ``patch_mask`` marks real ones), D the frozen
feature width, H ``width``, E ``embed_dim``, Q text queries per slide, L tokens.

``patch_in``       frozen feature (D) -> patch token (H): LayerNorm, 2-layer MLP, plus a learned
                   embedding of the patch's magnification (the multi-magnification form), LayerNorm.
``slide_encoder``  ``latents`` learnable tokens; each block: self-attention among them,
                   cross-attention to the slide's patch tokens, MLP. The first latent, through
                   ``slide_proj``, is the slide embedding (E).
``text``           BERT-family encoder; a text's embedding is the mean of its token states
                   through ``text_proj`` (E). The top ``text_trainable_layers`` layers train.
``pool``           text-conditioned region embedding of a slide for each query (E):
                   *attention*: ``w = softmax_P(q(t) . k(patch) / sqrt(H))``, region =
                   ``region_proj(sum_p w_p v(patch_p))``;
                   *soft_topk*: patch embeddings ``e_p = patch_proj(patch_p)``, ``w =
                   softmax_P(cos(t, e_p) / T)``, the top-k weights kept and renormalised,
                   region = ``sum_p w_p e_p``.
                   The weights ``w`` (B, Q, P) are the localisation of each query.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrplip_core.model.layers import CrossEncoder
from mrplip_core.pathflip_model.settings import PathflipDims, PathflipModelSettings


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim with ``mask`` (broadcastable, True = real) entries only."""
    return torch.softmax(logits.float().masked_fill(~mask, float("-inf")), dim=-1)


def keep_topk(weights: Tensor, k: int) -> Tensor:
    """Zero all but the ``k`` largest weights of the last dim and renormalise them to sum 1."""
    if k >= weights.shape[-1]:
        return weights
    top = weights.topk(k, dim=-1)
    kept = torch.zeros_like(weights).scatter(-1, top.indices, top.values)
    return kept / kept.sum(-1, keepdim=True).clamp_min(1e-12)


def freeze_text_layers(text: nn.Module, trainable_layers: int | None) -> None:
    """Freeze the embeddings and all but the top ``trainable_layers`` layers (None: none frozen)."""
    if trainable_layers is None:
        return
    layers = list(text.encoder.layer) if hasattr(text, "encoder") else []
    frozen = [text.embeddings, *layers[: max(0, len(layers) - trainable_layers)]] if hasattr(text, "embeddings") else layers
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


class PatchTokens(nn.Module):
    """Frozen patch feature (+ magnification) -> patch token."""

    def __init__(self, image_dim: int, width: int, n_magnifications: int, use_magnification: bool, dropout: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(image_dim)
        self.mlp = nn.Sequential(nn.Linear(image_dim, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width))
        self.magnification = nn.Embedding(n_magnifications, width) if use_magnification else None
        self.norm_out = nn.LayerNorm(width)

    def forward(self, features: Tensor, level: Tensor) -> Tensor:
        x = self.mlp(self.norm_in(features))
        if self.magnification is not None:
            x = x + self.magnification(level)
        return self.norm_out(x)


class PathFLIPModel(nn.Module):
    """Slide encoder, text encoder and text-conditioned pooling (see the module docstring)."""

    def __init__(self, settings: PathflipModelSettings, dims: PathflipDims, text: nn.Module) -> None:
        super().__init__()
        self.settings, self.dims = settings, dims
        s, h = settings, settings.width
        self.patch_in = PatchTokens(dims.image_dim, h, len(dims.magnifications),
                                    s.magnification_embedding and len(dims.magnifications) > 1, s.dropout)
        self.latents = nn.Parameter(torch.randn(s.latents, h) * 0.02)
        self.slide_encoder = CrossEncoder(h, s.heads, s.slide_layers, dropout=s.dropout)
        self.slide_proj = nn.Linear(h, s.embed_dim)
        self.text = text
        freeze_text_layers(text, s.text_trainable_layers)
        self.text_proj = nn.Linear(text.config.hidden_size, s.embed_dim)
        if s.pooling == "attention":
            self.pool_query = nn.Linear(s.embed_dim, h)
            self.pool_key = nn.Linear(h, h)
            self.pool_value = nn.Linear(h, h)
            self.region_proj = nn.Linear(h, s.embed_dim)
        else:
            self.patch_proj = nn.Linear(h, s.embed_dim)

    # --- slides -------------------------------------------------------------------------
    def patch_tokens(self, features: Tensor, level: Tensor) -> Tensor:
        """(B, P, D) features, (B, P) magnification index -> (B, P, H)."""
        return self.patch_in(features, level)

    def slide_embedding(self, tokens: Tensor, patch_mask: Tensor) -> Tensor:
        """(B, P, H) patch tokens -> (B, E) slide embedding (not normalised)."""
        latents = self.latents[None].expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        out = self.slide_encoder(latents, context=tokens, context_mask=patch_mask[:, None, :])
        return self.slide_proj(out[:, 0])

    # --- texts --------------------------------------------------------------------------
    def text_embedding(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L) tokens -> (N, E): mean of the token states, projected (not normalised)."""
        states = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask[..., None].to(states.dtype)
        return self.text_proj((states * m).sum(1) / m.sum(1).clamp_min(1.0))

    # --- text-conditioned pooling -------------------------------------------------------
    def pool(self, tokens: Tensor, patch_mask: Tensor, queries: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Region embeddings (B, Q, E), pooling weights (B, Q, P) and heatmap (B, Q, P) of each
        slide for each query (``queries``: (B, Q, E) text embeddings).

        The heatmap ranks every patch: the attention weights, or for soft top-k the softmax
        before the top-k cut (the same top patches; the cut leaves the others tied at 0).
        """
        s = self.settings
        mask = patch_mask[:, None, :]
        if s.pooling == "attention":
            q = self.pool_query(queries)
            k = self.pool_key(tokens)
            weights = masked_softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), mask)
            region = self.region_proj((weights.to(tokens.dtype) @ self.pool_value(tokens)))
            return region, weights, weights
        e = self.patch_proj(tokens)
        cos = F.normalize(queries.float(), dim=-1) @ F.normalize(e.float(), dim=-1).transpose(1, 2)
        heatmap = masked_softmax(cos / s.topk_temperature, mask)
        weights = keep_topk(heatmap, s.topk)
        return weights.to(e.dtype) @ e, weights, heatmap
