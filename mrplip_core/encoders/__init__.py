"""Frozen encoders, timm-style: a registry of typed specs and builders that load local weights.

    from mrplip_core.encoders import get_spec, list_encoders, load_image_encoder, load_text_encoder

    enc = load_image_encoder("uni", "/models/uni/pytorch_model.bin")   # strict, never downloads
    enc.attrs()  # encoder, weights path + sha256, dim, input px, mean/std, ...

Importing this package (or the registry) does not import torch; the builders do, lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mrplip_core.encoders import catalog as _catalog  # noqa: F401  (registers the entries)
from mrplip_core.encoders.registry import UnknownEncoderError, get_spec, list_encoders, register_encoder
from mrplip_core.encoders.spec import EncoderSpec
from mrplip_core.lazy import lazy_attributes

if TYPE_CHECKING:
    from mrplip_core.encoders.image import ImageEncoder, load_image_encoder
    from mrplip_core.encoders.text import TextEncoder, load_text_encoder
    from mrplip_core.encoders.weights import WeightsError

__all__ = [
    "EncoderSpec",
    "ImageEncoder",
    "TextEncoder",
    "UnknownEncoderError",
    "WeightsError",
    "get_spec",
    "list_encoders",
    "load_image_encoder",
    "load_text_encoder",
    "register_encoder",
]

_LAZY = {
    "ImageEncoder": "mrplip_core.encoders.image",
    "load_image_encoder": "mrplip_core.encoders.image",
    "TextEncoder": "mrplip_core.encoders.text",
    "load_text_encoder": "mrplip_core.encoders.text",
    "WeightsError": "mrplip_core.encoders.weights",
}


__getattr__ = lazy_attributes(__name__, _LAZY)
