"""The MR-PLIP model over frozen patch features.

Modules (H = the text encoder's width, E = ``embed_dim``):

``visual``          frozen image feature (D) -> visual token (H): LayerNorm, 2-layer MLP,
                    plus a learned embedding of the patch's magnification, LayerNorm.
``text``            trainable BERT-family encoder over the caption tokens (H per token).
``image_proj``,     visual token / pooled caption -> the shared space (E) of ITC; the
``text_proj``       ``text_pooling`` of the caption is its [CLS] state or the mean of its
                    token states.
``keyword_proj``    frozen keyword feature (Dt) -> the shared space (E), where CVTA
                    compares patches with the keywords of their bag and E_mm's top-k_o
                    keywords are chosen.
``fusion``          multimodal encoder for ITM and MLM: the patch's visual token is put in
                    front of the caption's token states and pre-LN blocks self-attend over
                    both (single-stream fusion, as in VLMo/mPLUG's fusion layers); ITM reads
                    the caption's [CLS] position, MLM every caption position. ALBEF's
                    cross-attention is not used here because the visual input is a single
                    token: softmax over one key is constant, so cross-attention would only
                    add the same visual vector to every text token, with no query-key
                    interaction (measured: ITM stayed at its prior on synthetic data).
``keyword_fusion``  E_mm: the visual token (one query) cross-attends to itself and its
                    top-k_o keywords (projected to H by ``keyword_tokens``); its output is
                    the text-guided visual representation z that MRTVA aligns across
                    magnifications.
``decoder``         PLM prefix-LM decoder (SimVLM-style, image as prefix): the visual
                    token followed by the caption's token embeddings (shared with ``text``)
                    through pre-LN blocks; every position sees the visual token, the
                    caption prefix bidirectionally and the suffix causally
                    (:func:`mrplip_core.model.layers.prefix_lm_attention_mask`).
``mlm_head``,       transform + output layer tied to the text encoder's word embeddings.
``plm_head``

Only the modules the active loss terms need are built (``heads``), so no parameter is
left without a gradient under DDP.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrplip_core.model.layers import CrossEncoder, prefix_lm_attention_mask
from mrplip_core.model.settings import ModelDims, ModelSettings
from mrplip_core.model.terms import TERMS

#: One head (set of modules) per objective term.
ALL_HEADS: tuple[str, ...] = TERMS


class VisualProjection(nn.Module):
    """Frozen patch feature + magnification -> visual token."""

    def __init__(self, image_dim: int, dim: int, n_magnifications: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(image_dim)
        self.mlp = nn.Sequential(nn.Linear(image_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.magnification = nn.Embedding(n_magnifications, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, features: Tensor, level: Tensor) -> Tensor:
        """(N, D) features, (N,) magnification index -> (N, dim)."""
        x = self.mlp(self.norm_in(features))
        return self.norm_out(x + self.magnification(level))


class LMHead(nn.Module):
    """BERT-style LM head; the output matrix is the (tied) word embedding, passed in."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        """(..., dim) -> (..., vocab) logits."""
        return F.linear(self.transform(hidden), word_embeddings, self.bias)


class MRPLIPModel(nn.Module):
    """See the module docstring.

    Parameters
    ----------
    settings: the ``pretrain.model`` section.
    dims: sizes fixed by the data and the tokenizer.
    text_encoder: a ``transformers`` encoder (``build_text_encoder``).
    heads: the loss terms to build modules for (default: all six).
    keyword_top_k: k_o of E_mm.
    text_pooling: "cls" or "mean" pooling of the caption for ITC.
    """

    def __init__(
        self, settings: ModelSettings, dims: ModelDims, text_encoder: nn.Module, *,
        heads: Iterable[str] = ALL_HEADS, keyword_top_k: int = 5, text_pooling: str = "mean",
    ) -> None:
        super().__init__()
        heads = tuple(heads)
        unknown = sorted(set(heads) - set(ALL_HEADS))
        if unknown:
            raise ValueError(f"unknown heads {unknown}")
        if text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean', got {text_pooling!r}")
        self.settings, self.dims, self.heads = settings, dims, heads
        self.keyword_top_k = int(keyword_top_k)
        self.text_pooling = text_pooling
        config = text_encoder.config
        width, n_heads = int(config.hidden_size), int(config.num_attention_heads)
        self.width = width
        blocks = {"mlp_ratio": settings.mlp_ratio, "dropout": settings.dropout}

        self.visual = VisualProjection(dims.image_dim, width, len(dims.magnifications), settings.visual_hidden or width, settings.dropout)
        self.text = text_encoder
        if settings.gradient_checkpointing and hasattr(text_encoder, "gradient_checkpointing_enable"):
            text_encoder.gradient_checkpointing_enable()
        self.image_proj = nn.Linear(width, settings.embed_dim)
        self.text_proj = nn.Linear(width, settings.embed_dim)
        if "cvta" in heads or "mrtva" in heads:
            self.keyword_proj = nn.Linear(dims.keyword_dim, settings.embed_dim)
        if "mrtva" in heads:
            self.keyword_tokens = nn.Sequential(nn.Linear(dims.keyword_dim, width), nn.LayerNorm(width))
            self.keyword_fusion = CrossEncoder(width, n_heads, settings.keyword_fusion_layers, self_attention=False, **blocks)
        if "itm" in heads or "mlm" in heads:
            self.fusion = CrossEncoder(width, n_heads, settings.fusion_layers, cross_attention=False, **blocks)
        if "mlm" in heads:
            self.mlm_head = LMHead(width, dims.vocab_size)
        if "plm" in heads:
            self.decoder = CrossEncoder(width, n_heads, settings.decoder_layers, cross_attention=False, **blocks)
            self.plm_head = LMHead(width, dims.vocab_size)

    # -- unimodal -------------------------------------------------------------------------
    def visual_tokens(self, features: Tensor, level: Tensor) -> Tensor:
        """(N, D) frozen features (any float dtype), (N,) magnification index -> (N, H)."""
        return self.visual(features.to(self.image_proj.weight.dtype), level)

    def text_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L) ids and mask -> (N, L, H) token states of the text encoder."""
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool_text(self, states: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L, H) states -> (N, H) caption vector ([CLS] or masked mean)."""
        if self.text_pooling == "cls":
            return states[:, 0]
        weights = attention_mask.to(states.dtype)[..., None]
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def image_embedding(self, tokens: Tensor) -> Tensor:
        """(N, H) visual tokens -> (N, E) (not normalised; the losses normalise)."""
        return self.image_proj(tokens)

    def text_embedding(self, states: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L, H) caption states -> (N, E) (not normalised)."""
        return self.text_proj(self.pool_text(states, attention_mask))

    def keyword_embedding(self, keyword_features: Tensor) -> Tensor:
        """(B, K, Dt) frozen keyword features -> (B, K, E)."""
        return self.keyword_proj(keyword_features.to(self.keyword_proj.weight.dtype))

    # -- multimodal -----------------------------------------------------------------------
    def fuse_tokens(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """Multimodal encoder: (M, V, H) visual, (M, L, H) caption states, (M, L) mask -> (M, L, H)
        fused caption states (the visual positions are dropped from the output)."""
        v = image_tokens.shape[1]
        x = torch.cat([image_tokens.to(text_tokens.dtype), text_tokens], dim=1)
        key_mask = torch.cat([torch.ones_like(text_mask[:, :1]).expand(-1, v), text_mask], dim=1).bool()[:, None, :]
        return self.fusion(x, self_mask=key_mask)[:, v:]

    def fuse(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """ITM's fusion function (``losses.itm.FuseFn``): the fused [CLS] state (M, H)."""
        return self.fuse_tokens(image_tokens, text_tokens, text_mask)[:, 0]

    def text_guided(self, visual_tokens: Tensor, keyword_tokens: Tensor, keyword_valid: Tensor) -> Tensor:
        """E_mm: z for each patch from its visual token and its selected keywords.

        (N, H) visual tokens, (N, k, H) keyword tokens, (N, k) bool valid -> (N, H). The
        visual token is always a key, so a patch whose bag has no keyword still gets a z.
        """
        query = visual_tokens[:, None]
        context = torch.cat([query, keyword_tokens], dim=1)
        valid = torch.cat([torch.ones_like(keyword_valid[:, :1]), keyword_valid], dim=1)
        return self.keyword_fusion(query, context=context, context_mask=valid[:, None, :])[:, 0]

    def mlm_logits(self, fused: Tensor) -> Tensor:
        """(..., H) fused states -> (..., vocab) logits."""
        return self.mlm_head(fused, self.word_embeddings())

    def decode(self, input_ids: Tensor, attention_mask: Tensor, prefix_lengths: Tensor, image_tokens: Tensor) -> Tensor:
        """PLM decoder: (M, L) ids, mask, (M,) prefix lengths, (M, V, H) visual -> (M, L, H)
        caption states (position t predicts token t + 1)."""
        v = image_tokens.shape[1]
        text = self.text.embeddings(input_ids=input_ids)
        x = torch.cat([image_tokens.to(text.dtype), text], dim=1)
        m, length = input_ids.shape
        mask = torch.zeros(m, v + length, v + length, dtype=torch.bool, device=input_ids.device)
        mask[:, :, :v] = True  # everyone sees the visual prefix
        mask[:, v:, v:] = prefix_lm_attention_mask(prefix_lengths, attention_mask)
        return self.decoder(x, self_mask=mask)[:, v:]

    def plm_logits(self, decoded: Tensor) -> Tensor:
        return self.plm_head(decoded, self.word_embeddings())

    def word_embeddings(self) -> Tensor:
        return self.text.get_input_embeddings().weight
