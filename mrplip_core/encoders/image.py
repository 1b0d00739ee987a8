"""Image encoders: a built model plus everything needed to feed it and to describe its output.

Preprocessing is split so the heavy part runs where it is cheapest:
- on the CPU, in DataLoader workers: :func:`resize_patch` (uint8 HWC, cv2) to ``input_px``;
- on the model's device: :meth:`ImageEncoder.normalize` (uint8 NHWC -> float NCHW,
  ``(x / 255 - mean) / std``), so only uint8 crosses the bus.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from mrplip_core.encoders.build import (
    instantiate,
    open_clip_config,
    open_clip_factory,
    resolve_weights,
    timm_factory,
)
from mrplip_core.encoders.registry import get_spec
from mrplip_core.encoders.spec import EncoderSpec
from mrplip_core.encoders.weights import WeightsInfo


def resize_patch(image: np.ndarray, input_px: int) -> np.ndarray:
    """Resize an RGB uint8 patch (H, W, 3) to ``input_px`` x ``input_px`` (spec interpolation "area").

    Area interpolation when shrinking (anti-aliased, like a box filter), cubic when
    enlarging; returned unchanged when already the right size.
    """
    h, w = image.shape[:2]
    if (h, w) == (input_px, input_px):
        return image
    interp = cv2.INTER_AREA if (h >= input_px and w >= input_px) else cv2.INTER_CUBIC
    return cv2.resize(image, (input_px, input_px), interpolation=interp)


@dataclass
class ImageEncoder:
    """A frozen image encoder: ``module`` maps normalised (B, 3, input_px, input_px) to (B, dim).

    ``input_px``, ``mean`` and ``std`` start from the spec; an open_clip folder's own
    ``preprocess_cfg`` overrides them (the weights' config is authoritative).
    """

    spec: EncoderSpec
    module: nn.Module
    weights: WeightsInfo
    dim: int
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    _affine_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def normalize(self, batch: torch.Tensor, *, channels_last: bool = True) -> torch.Tensor:
        """uint8 (B, H, W, 3) on any device -> float32 (B, 3, H, W), ``(x/255 - mean)/std``.

        The NHWC input permuted to NCHW is already channels_last in memory; with
        ``channels_last=False`` it is made contiguous NCHW.
        """
        x = batch.permute(0, 3, 1, 2).float()
        scale, shift = self._affine(x.device)
        x = x.mul_(scale).sub_(shift)
        return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 / (255 std), mean / std)`` as (1, 3, 1, 1) tensors, made once per device.

        Cached because building them from Python floats is a blocking host-to-device copy,
        which would make every batch wait for the GPU.
        """
        key = str(device)
        if key not in self._affine_cache:
            scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(1, 3, 1, 1)
            shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)]).view(1, 3, 1, 1)
            self._affine_cache[key] = (scale.to(device), shift.to(device))
        return self._affine_cache[key]

    def attrs(self) -> dict[str, Any]:
        """What an output file records about this encoder (spec, weights, input)."""
        return {
            **self.spec.attrs(),
            **self.weights.attrs(),
            "dim": int(self.dim),
            "input_px": int(self.input_px),
            "mean": list(map(float, self.mean)),
            "std": list(map(float, self.std)),
            "interpolation": self.spec.interpolation,
        }


class _OpenClipImage(nn.Module):
    """The image tower of an open_clip CLIP: projected embedding, not L2-normalised."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def open_clip_input(
    spec: EncoderSpec, model_cfg: dict, preprocess: dict
) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
    """``(input_px, mean, std)`` of an open_clip image tower: the weights' ``preprocess_cfg``
    first, then the model config's image size, then the spec."""
    size = preprocess.get("size", model_cfg["vision_cfg"].get("image_size", spec.input_px))
    input_px = int(size[0] if isinstance(size, (list, tuple)) else size)
    mean = tuple(float(v) for v in preprocess.get("mean", spec.mean))
    std = tuple(float(v) for v in preprocess.get("std", spec.std))
    return input_px, mean, std  # type: ignore[return-value]


def load_image_encoder(
    name: str | EncoderSpec,
    weights: str | os.PathLike[str] | None = None,
    *,
    allow_random_init: bool = True,
) -> ImageEncoder:
    """Build the image encoder ``name`` (a registry name or a spec) on CPU, in eval mode, fp32.

    Parameters
    ----------
    name: registry name (``mrplip encoders``) or an :class:`EncoderSpec`.
    weights: local weights (see ``EncoderSpec.weights_format``); None: bundled weights if
        the spec has any, else a seeded random init (``weights: random-init`` in attrs).
    allow_random_init: when False, a real encoder without weights is an error.

    Raises
    ------
    WeightsError: missing file, unreadable file, or weights that do not fit (names keys).
    """
    spec = get_spec(name) if isinstance(name, str) else name
    if spec.kind != "image":
        raise ValueError(f"encoder {spec.name!r} is a {spec.kind} encoder, not an image encoder")
    path = resolve_weights(spec, weights, allow_random_init)
    if spec.family == "timm":
        module, info = instantiate(timm_factory(spec), spec, path)
        return ImageEncoder(spec, module, info, int(module.num_features), spec.input_px, spec.mean, spec.std)
    if spec.family == "open_clip":
        model_cfg, pre, checkpoint = open_clip_config(spec, path)
        clip, info = instantiate(open_clip_factory(model_cfg), spec, checkpoint)
        input_px, mean, std = open_clip_input(spec, model_cfg, pre)
        return ImageEncoder(spec, _OpenClipImage(clip).eval(), info, int(model_cfg["embed_dim"]), input_px, mean, std)
    raise ValueError(f"encoder {spec.name!r}: family {spec.family!r} has no image builder")
