"""Settings of the PathFLIP model (config section ``pathflip.model``) and its data-fixed sizes.

PathFLIP's paper leaves most sizes open; the defaults are this project's, small enough for
the CPU demo and sound for a cohort (``# real:`` comments in config.yaml):

* ``width`` 256: patch tokens, latent tokens and the attention pooling work at this width.
* ``latents`` 16 learnable latent tokens cross-attend to the slide's patches in
  ``slide_layers`` blocks (self-attention among latents, then cross-attention to the patches);
  the first latent, projected, is the slide embedding.
* ``pooling``: how a sub-caption pools the patches into its region embedding:
  ``attention`` (one query per sub-caption, softmax over the slide's patches) or ``soft_topk``
  (softmax of the cosine similarities at ``topk_temperature``, the top ``topk`` kept and
  renormalised, as in the paper). Either way the weights are a heatmap over the patches.
* The text encoder (MiniLM by default, as MR-PLIP's) is "partly trained":
  ``text_trainable_layers`` top layers train, the rest (embeddings included) stay frozen;
  null trains all of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

POOLINGS = ("attention", "soft_topk")


@dataclass(frozen=True)
class PathflipModelSettings:
    """What the PathFLIP model is made of (see the module docstring)."""

    text_encoder: str = "minilm"  # "minilm" (bundled), a local HF folder, or "random"
    text_config: Mapping[str, Any] = field(default_factory=dict)  # HF config overrides (see model.text)
    tokenizer: str | None = None  # tokenizer folder; null: the text encoder's
    text_trainable_layers: int | None = None  # top text layers that train; null: all; 0: frozen
    embed_dim: int = 256  # the shared slide/region/text space
    width: int = 256  # patch and latent tokens
    heads: int = 4  # attention heads of the slide encoder and the attention pooling
    latents: int = 16  # latent tokens of the slide encoder (the first is the slide's)
    slide_layers: int = 2  # latent blocks: self-attention, cross-attention to patches, MLP
    pooling: str = "soft_topk"  # soft_topk (the paper's) | attention (text-conditioned region pooling)
    topk: int = 32  # soft_topk: patches kept per query
    topk_temperature: float = 0.5  # soft_topk: softmax temperature of the cosines
    magnification_embedding: bool = True  # add a learned embedding of each patch's magnification
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pathflip.model.pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        for name in ("embed_dim", "width", "heads", "latents", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"pathflip.model.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"pathflip.model.width {self.width} is not divisible by heads {self.heads}")
        if self.topk_temperature <= 0:
            raise ValueError("pathflip.model.topk_temperature must be > 0")
        if self.text_trainable_layers is not None and self.text_trainable_layers < 0:
            raise ValueError("pathflip.model.text_trainable_layers must be >= 0 or null")
        object.__setattr__(self, "text_config", dict(self.text_config or {}))


@dataclass(frozen=True)
class PathflipDims:
    """Sizes fixed by the data and the text encoder (recorded in the export)."""

    image_dim: int  # D of the patch features
    magnifications: tuple[float, ...]  # magnifications of the patches (index = embedding row)
    vocab_size: int  # tokenizer vocabulary
