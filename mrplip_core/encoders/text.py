"""Text encoders: strings -> (N, D) float32 embeddings, from local files only."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mrplip_core.encoders.build import find_checkpoint, instantiate, open_clip_config, open_clip_factory, resolve_weights
from mrplip_core.encoders.registry import get_spec
from mrplip_core.encoders.runtime import autocast, resolve_device, resolve_precision
from mrplip_core.encoders.spec import EncoderSpec
from mrplip_core.encoders.weights import WeightsError, WeightsInfo


@dataclass
class TextEncoder:
    """A frozen text encoder.

    ``tokenize(texts)`` gives the model's keyword inputs (truncated to ``max_tokens``),
    ``module(**inputs)`` the (B, dim) embeddings; ``count_tokens(texts)`` the untruncated
    token counts (to report how many texts were cut).
    """

    spec: EncoderSpec
    module: nn.Module
    weights: WeightsInfo
    dim: int
    max_tokens: int
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]]
    count_tokens: Callable[[list[str]], list[int]]

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> np.ndarray:
        """Embed ``texts``; returns float32 (len(texts), dim) in the input order.

        Texts are batched by length (less padding) and put back in order. ``precision``
        "auto" is the spec's autocast dtype on GPU and fp32 on CPU.
        """
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        prec = resolve_precision(precision, self.spec, dev)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        self.module.to(dev).eval()
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                inputs = {k: v.to(dev, non_blocking=True) for k, v in self.tokenize([texts[i] for i in idx]).items()}
                with autocast(dev, prec):
                    feats = self.module(**inputs)
                out[idx] = feats.float().cpu().numpy()
        return out

    def attrs(self) -> dict[str, Any]:
        """What an output file records about this encoder (spec, weights, tokens)."""
        return {
            **self.spec.attrs(),
            **self.weights.attrs(),
            "dim": int(self.dim),
            "max_tokens": int(self.max_tokens),
            "normalized": bool(self.spec.normalize),
        }


class _MeanPooledHF(nn.Module):
    """A transformers encoder, mean-pooled over non-padding tokens, optionally L2-normalised."""

    def __init__(self, model: nn.Module, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled.float(), dim=-1) if self.normalize else pooled


class _OpenClipText(nn.Module):
    """The text tower of an open_clip CLIP: projected EOT embedding, not L2-normalised."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        clip.visual = None  # the image tower is not needed here
        self.clip = clip

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(text, normalize=False)


def _load_hf(spec: EncoderSpec, folder: Path) -> TextEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    what = f"encoder {spec.name!r}"
    if not folder.is_dir():
        raise WeightsError(f"{what}: expected a Hugging Face model folder, got {folder}")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    checkpoint = find_checkpoint(folder, what, open_clip=False)
    model, info = instantiate(lambda: AutoModel.from_config(config), spec, checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    max_tokens = int(spec.context_length or tokenizer.model_max_length)
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_tokens = int(json.loads(st_config.read_text()).get("max_seq_length", max_tokens))
    if spec.arch_kwargs.get("pooling", "mean") != "mean":
        raise ValueError(f"{what}: only mean pooling is implemented")

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"))

    def count_tokens(texts: list[str]) -> list[int]:
        if not texts:
            return []
        ids = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]

    module = _MeanPooledHF(model, spec.normalize).eval()
    return TextEncoder(spec, module, info, int(config.hidden_size), max_tokens, tokenize, count_tokens)


def _load_open_clip(spec: EncoderSpec, path: Path | None) -> TextEncoder:
    from open_clip.tokenizer import SimpleTokenizer

    model_cfg, _, checkpoint = open_clip_config(spec, path)
    clip, info = instantiate(open_clip_factory(model_cfg), spec, checkpoint)
    context = int(model_cfg["text_cfg"].get("context_length", spec.context_length or 77))
    tokenizer = SimpleTokenizer(context_length=context)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return {"text": tokenizer(texts, context_length=context)}

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(tokenizer.encode(t)) + 2 for t in texts]  # + start and end tokens

    module = _OpenClipText(clip).eval()
    return TextEncoder(spec, module, info, int(model_cfg["embed_dim"]), context, tokenize, count_tokens)


def load_text_encoder(
    name: str | EncoderSpec,
    weights: str | os.PathLike[str] | None = None,
    *,
    allow_random_init: bool = True,
) -> TextEncoder:
    """Build the text encoder ``name`` on CPU, eval mode, fp32 (see :func:`load_image_encoder`)."""
    spec = get_spec(name) if isinstance(name, str) else name
    if spec.kind != "text":
        raise ValueError(f"encoder {spec.name!r} is an {spec.kind} encoder, not a text encoder")
    path = resolve_weights(spec, weights, allow_random_init)
    if spec.family == "hf":
        if path is None:
            raise WeightsError(f"encoder {spec.name!r} needs a model folder (its config and tokenizer)")
        return _load_hf(spec, path)
    if spec.family == "open_clip":
        return _load_open_clip(spec, path)
    raise ValueError(f"encoder {spec.name!r}: family {spec.family!r} has no text builder")
