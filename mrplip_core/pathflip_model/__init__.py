"""The PathFLIP model: slide encoder, trainable text encoder and text-conditioned region pooling.

Names are imported on first use (:mod:`mrplip_core.lazy`): torch loads only when one is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mrplip_core.lazy import lazy_attributes

if TYPE_CHECKING:
    from mrplip_core.pathflip_model.export import PretrainedPathFLIP, load_pathflip, save_pathflip
    from mrplip_core.pathflip_model.model import PathFLIPModel
    from mrplip_core.pathflip_model.settings import PathflipDims, PathflipModelSettings

__all__ = ["PathFLIPModel", "PathflipDims", "PathflipModelSettings", "PretrainedPathFLIP", "load_pathflip", "save_pathflip"]

_LAZY = {
    "PathFLIPModel": "mrplip_core.pathflip_model.model",
    "PathflipDims": "mrplip_core.pathflip_model.settings",
    "PathflipModelSettings": "mrplip_core.pathflip_model.settings",
    "PretrainedPathFLIP": "mrplip_core.pathflip_model.export",
    "load_pathflip": "mrplip_core.pathflip_model.export",
    "save_pathflip": "mrplip_core.pathflip_model.export",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
