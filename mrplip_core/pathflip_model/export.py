"""The exported PathFLIP model of a run and the loader users call.

``results/pathflip/{run}/`` holds, once the run has finished: ``model.json`` (format, settings,
data-fixed sizes, the text encoder's config, temperatures), ``tokenizer/`` and
``model.safetensors`` (written last: its presence means the export is complete).

>>> from mrplip_core.pathflip_model import load_pathflip
>>> m = load_pathflip("results/pathflip/demo")
>>> s = m.encode_slide(features, magnification=20.0)          # (P, D) patches -> (E,), L2-normalised
>>> t = m.encode_text(["tumour with necrosis"])                 # (1, E)
>>> w = m.localize(features, 20.0, ["tumour with necrosis"])   # (1, P) pooling weights, sum 1
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from mrplip_core.config_mapping import from_mapping, to_plain
from mrplip_core.io.atomic import atomic_path, write_text
from mrplip_core.model.export import magnification_levels
from mrplip_core.model.text import text_encoder_from_config
from mrplip_core.pathflip_model.model import PathFLIPModel
from mrplip_core.pathflip_model.settings import PathflipDims, PathflipModelSettings

EXPORT_FORMAT = "mrplip.pathflip/1"
WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
TOKENIZER = "tokenizer"


def save_pathflip(run_dir: str | Path, model: PathFLIPModel, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.json`` then ``model.safetensors`` (atomically) into ``run_dir``."""
    run_dir = Path(run_dir)
    meta = {"format": EXPORT_FORMAT, "settings": to_plain(model.settings), "dims": to_plain(model.dims),
            "text_config": model.text.config.to_dict(), **(extra or {})}
    write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", run_dir / MODEL_JSON)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": EXPORT_FORMAT})
    return run_dir / WEIGHTS


class PretrainedPathFLIP:
    """A trained PathFLIP: slide and text embeddings, and text-to-patch localisation."""

    def __init__(self, model: PathFLIPModel, tokenizer: Any, meta: dict[str, Any], device: torch.device) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device

    @property
    def magnifications(self) -> tuple[float, ...]:
        return tuple(self.model.dims.magnifications)

    @property
    def logit_scale(self) -> float:
        """1 / tau of L_slide at the end of training (slide zero-shot logits)."""
        t = self.meta.get("slide_temperature")
        return 1.0 / float(t) if t else 1.0 / 0.07

    def _tokens(self, features: Tensor | np.ndarray, magnification: float | Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
        feats = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features)
        if feats.ndim != 2 or feats.shape[1] != self.model.dims.image_dim:
            raise ValueError(f"patch features must be (P, {self.model.dims.image_dim}), got {tuple(feats.shape)}")
        if not len(feats):
            raise ValueError("no patch features: a slide needs at least one patch")
        levels = magnification_levels(magnification, self.magnifications, len(feats)).to(self.device)
        tokens = self.model.patch_tokens(feats[None].to(self.device, torch.float32), levels[None])
        return tokens, torch.ones(1, len(feats), dtype=torch.bool, device=self.device)

    @torch.no_grad()
    def encode_slide(self, features: Tensor | np.ndarray, magnification: float | Sequence[float] | Tensor) -> Tensor:
        """L2-normalised (E,) slide embedding of its (P, D) patch features (all of them)."""
        tokens, mask = self._tokens(features, magnification)
        return F.normalize(self.model.slide_embedding(tokens, mask).float(), dim=-1)[0].cpu()

    @torch.no_grad()
    def _text(self, texts: Sequence[str], max_tokens: int) -> Tensor:
        if not len(texts) or any(not str(t).strip() for t in texts):
            raise ValueError("every text query must be non-empty")
        enc = self.tokenizer(list(texts), truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
        return self.model.text_embedding(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised (N, E) text embeddings (captions, prompts, sub-captions)."""
        return F.normalize(self._text(texts, int(self.meta.get("max_caption_tokens", 256))).float(), dim=-1).cpu()

    @torch.no_grad()
    def localize(self, features: Tensor | np.ndarray, magnification: float | Sequence[float] | Tensor,
                 texts: Sequence[str]) -> Tensor:
        """(Q, P) heatmap of each text over the slide's patches (each row sums to 1): the
        pooling's attention weights, or for soft top-k its softmax before the top-k cut."""
        tokens, mask = self._tokens(features, magnification)
        queries = self._text(texts, int(self.meta.get("max_subcaption_tokens", 64)))
        _, _, heatmap = self.model.pool(tokens, mask, queries[None])
        return heatmap[0].float().cpu()


def load_pathflip(run_dir: str | Path, device: str | torch.device = "cpu") -> PretrainedPathFLIP:
    """Load the exported model of a finished PathFLIP run (``results/pathflip/{run}``)."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    if not (run_dir / WEIGHTS).exists():
        raise FileNotFoundError(f"{run_dir / WEIGHTS} not found: the run has not finished (or is not a PathFLIP run folder)")
    meta = json.loads((run_dir / MODEL_JSON).read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{run_dir / MODEL_JSON}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
    settings = from_mapping(PathflipModelSettings, meta["settings"], "model.json settings")
    dims_raw = dict(meta["dims"])
    dims = PathflipDims(int(dims_raw["image_dim"]), tuple(float(m) for m in dims_raw["magnifications"]),
                        int(dims_raw["vocab_size"]))
    model = PathFLIPModel(settings, dims, text_encoder_from_config(meta["text_config"]))
    model.load_state_dict(load_file(str(run_dir / WEIGHTS), device="cpu"), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / TOKENIZER), local_files_only=True)
    return PretrainedPathFLIP(model, tokenizer, meta, torch.device(device))
