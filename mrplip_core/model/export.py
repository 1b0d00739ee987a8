"""The exported model of a run and the loader evaluation uses.

``results/pretrain/{run}/`` holds, once the run has finished:

* ``model.json``: format, model settings, data-fixed sizes, the text encoder's config,
  the ITC temperature;
* ``tokenizer/``: the caption tokenizer;
* ``model.safetensors``: the model's weights (written last, so its presence means the
  export is complete; the Snakemake rule's output).

>>> from mrplip_core.model import load
>>> m = load("results/pretrain/demo")
>>> img = m.encode_image(features, magnification=20.0)   # (N, D) -> (N, E), L2-normalised
>>> txt = m.encode_text(["tumor tissue", "stroma"])       # (2, E), L2-normalised
>>> (m.logit_scale * img @ txt.T).softmax(-1)             # zero-shot probabilities
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

from mrplip_core.layout import TEMPLATES

from mrplip_core.config_mapping import from_mapping, to_plain
from mrplip_core.io.atomic import atomic_path, write_text
from mrplip_core.model.mrplip import MRPLIPModel
from mrplip_core.model.settings import ModelDims, ModelSettings
from mrplip_core.model.text import text_encoder_from_config

EXPORT_FORMAT = "mrplip.pretrained/1"
WEIGHTS = Path(TEMPLATES["model"]).name  # model.safetensors, the layout's ``model`` artifact
MODEL_JSON = Path(TEMPLATES["model_json"]).name  # model.json
TOKENIZER = "tokenizer"


def save_export(run_dir: str | Path, model: MRPLIPModel, *, itc_temperature: float | None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.json`` then ``model.safetensors`` (atomically) into ``run_dir``."""
    run_dir = Path(run_dir)
    meta = {
        "format": EXPORT_FORMAT,
        "settings": to_plain(model.settings),
        "dims": to_plain(model.dims),
        "heads": list(model.heads),
        "keyword_top_k": model.keyword_top_k,
        "text_pooling": model.text_pooling,
        "text_config": model.text.config.to_dict(),
        "itc_temperature": itc_temperature,
        **(extra or {}),
    }
    write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", run_dir / MODEL_JSON)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": EXPORT_FORMAT})
    return run_dir / WEIGHTS


def magnification_levels(magnification: float | Sequence[float] | np.ndarray | Tensor, configured: Sequence[float], n: int) -> Tensor:
    """(n,) long index of the configured magnification nearest (in log2) to each value."""
    values = torch.as_tensor(np.asarray(magnification, dtype=np.float64) if not isinstance(magnification, Tensor) else magnification, dtype=torch.float64).reshape(-1)
    if values.numel() == 1:
        values = values.expand(n)
    if values.numel() != n:
        raise ValueError(f"{values.numel()} magnifications for {n} feature rows")
    if bool((values <= 0).any()):
        raise ValueError("magnifications must be positive (x, e.g. 20.0)")
    grid = torch.log2(torch.tensor(list(configured), dtype=torch.float64))
    return (torch.log2(values)[:, None] - grid[None]).abs().argmin(dim=1)


class PretrainedMRPLIP:
    """A trained MR-PLIP for evaluation: image and text embeddings in the ITC space."""

    def __init__(self, model: MRPLIPModel, tokenizer: Any, meta: dict[str, Any], device: torch.device, max_tokens: int = 64) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device
        self.max_tokens = max_tokens

    @property
    def magnifications(self) -> tuple[float, ...]:
        return tuple(self.model.dims.magnifications)

    @property
    def embed_dim(self) -> int:
        return int(self.model.settings.embed_dim)

    @property
    def logit_scale(self) -> float:
        """1 / tau of ITC at the end of training (for zero-shot logits)."""
        t = self.meta.get("itc_temperature")
        return 1.0 / float(t) if t else 1.0 / 0.07

    @torch.no_grad()
    def encode_image(self, features: Tensor | np.ndarray, magnification: float | Sequence[float] | Tensor, batch_size: int = 4096) -> Tensor:
        """L2-normalised (N, E) embeddings of (N, D) frozen patch features.

        ``magnification`` (x) is one value for all rows or one per row; each is mapped to
        the nearest magnification the model was trained with (log scale).
        """
        feats = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features)
        if feats.ndim != 2 or feats.shape[1] != self.model.dims.image_dim:
            raise ValueError(f"features must be (N, {self.model.dims.image_dim}), got {tuple(feats.shape)}")
        levels = magnification_levels(magnification, self.magnifications, len(feats))
        out = []
        for start in range(0, len(feats), batch_size):
            chunk = feats[start : start + batch_size].to(self.device, torch.float32)
            tokens = self.model.visual_tokens(chunk, levels[start : start + batch_size].to(self.device))
            out.append(F.normalize(self.model.image_embedding(tokens).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """L2-normalised (N, E) embeddings of texts (prompts, captions)."""
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[start : start + batch_size]), truncation=True, max_length=self.max_tokens,
                                 padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            states = self.model.text_states(ids, mask)
            out.append(F.normalize(self.model.text_embedding(states, mask).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> PretrainedMRPLIP:
    """Load the exported model of a finished run (``results/pretrain/{run}``)."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    if not (run_dir / WEIGHTS).exists():
        raise FileNotFoundError(f"{run_dir / WEIGHTS} not found: the run has not finished (or is not a run folder)")
    meta = json.loads((run_dir / MODEL_JSON).read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{run_dir / MODEL_JSON}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
    settings = from_mapping(ModelSettings, meta["settings"], "model.json settings")
    dims_raw = dict(meta["dims"])
    dims_raw["magnifications"] = tuple(dims_raw["magnifications"])
    dims = ModelDims(**dims_raw)
    text = text_encoder_from_config(meta["text_config"])
    model = MRPLIPModel(settings, dims, text, heads=meta["heads"], keyword_top_k=meta["keyword_top_k"],
                        text_pooling=meta.get("text_pooling", "mean"))
    model.load_state_dict(load_file(str(run_dir / WEIGHTS), device="cpu"), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / TOKENIZER), local_files_only=True)
    return PretrainedMRPLIP(model, tokenizer, meta, torch.device(device), max_tokens=int(meta.get("max_caption_tokens", 64)))
