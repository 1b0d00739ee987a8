"""Settings of the MR-PLIP model (config section ``pretrain.model``).

The paper leaves these sizes open; the defaults are this project's choices, ALBEF-like
but smaller because the visual input is one frozen feature per patch, not a ViT:

* ``embed_dim`` 256: the shared image-text space of ITC and CVTA (ALBEF uses 256).
* the text encoder's own width (MiniLM: 384, 6 layers, 12 heads) is the width of every
  multimodal module, so none needs a resizing layer.
* 2 fusion layers (text attends to the patch token; ITM and MLM), 2 E_mm layers (patch
  token attends to its top-k_o keywords; the text-guided representation z for MRTVA),
  2 prefix-LM decoder layers (PLM).
* ``keyword_top_k`` = k_o of E_mm; null uses the CVTA loss's k_o (default 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSettings:
    """What the model is made of. See the module docstring for the defaults' rationale."""

    text_encoder: str = "minilm"  # "minilm" (bundled), a local HF folder, or "random"
    text_config: Mapping[str, Any] = field(default_factory=dict)  # HF config overrides (see model.text)
    tokenizer: str | None = None  # tokenizer folder; null: the text encoder's (MiniLM for "random")
    embed_dim: int = 256  # width of the ITC / CVTA space
    text_pooling: str = "mean"  # caption vector for ITC: "mean" of token states (MiniLM's own) or "cls"
    visual_hidden: int | None = None  # hidden width of the visual projection MLP; null: text width
    fusion_layers: int = 2  # multimodal encoder for ITM / MLM (text tokens attend to the patch)
    keyword_fusion_layers: int = 2  # E_mm: patch token attends to its top-k_o keywords -> z
    decoder_layers: int = 2  # prefix-LM decoder (PLM)
    mlp_ratio: float = 4.0  # feed-forward width / model width in the new layers
    dropout: float = 0.1  # dropout of the new layers (the text encoder keeps its config's)
    keyword_top_k: int | None = None  # k_o fused by E_mm; null: loss.cvta.k_o
    gradient_checkpointing: bool = False  # recompute text-encoder activations (memory for time)

    def __post_init__(self) -> None:
        for name in ("embed_dim", "fusion_layers", "keyword_fusion_layers", "decoder_layers"):
            if getattr(self, name) < (1 if name == "embed_dim" else 0):
                raise ValueError(f"pretrain.model.{name} must be positive, got {getattr(self, name)}")
        if self.text_pooling not in ("mean", "cls"):
            raise ValueError(f"pretrain.model.text_pooling must be mean or cls, got {self.text_pooling!r}")
        object.__setattr__(self, "text_config", dict(self.text_config or {}))


@dataclass(frozen=True)
class ModelDims:
    """Sizes fixed by the data and the text encoder (recorded in the export)."""

    image_dim: int  # D of the frozen image features
    keyword_dim: int  # Dt of the frozen keyword features
    magnifications: tuple[float, ...]  # configured magnifications (index = embedding row)
    vocab_size: int  # tokenizer vocabulary
