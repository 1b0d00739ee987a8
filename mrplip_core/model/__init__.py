"""The MR-PLIP model over frozen patch features, and the loader of trained runs.

``load(run_dir)`` returns an object with ``.encode_image(features, magnification)`` and
``.encode_text(texts)`` (L2-normalised embeddings in the ITC space) for evaluation.

Names are imported on first use (:mod:`mrplip_core.lazy`), so the torch-free modules
(:mod:`~mrplip_core.model.settings`, :mod:`~mrplip_core.model.terms`) load without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mrplip_core.lazy import lazy_attributes

if TYPE_CHECKING:
    from mrplip_core.model.export import PretrainedMRPLIP, load, magnification_levels, save_export
    from mrplip_core.model.mrplip import ALL_HEADS, MRPLIPModel
    from mrplip_core.model.settings import ModelDims, ModelSettings
    from mrplip_core.model.text import build_text_encoder, bundled_minilm_dir, load_tokenizer

__all__ = [
    "ALL_HEADS",
    "MRPLIPModel",
    "ModelDims",
    "ModelSettings",
    "PretrainedMRPLIP",
    "build_text_encoder",
    "bundled_minilm_dir",
    "load",
    "load_tokenizer",
    "magnification_levels",
    "save_export",
]

_LAZY = {
    "PretrainedMRPLIP": "mrplip_core.model.export",
    "load": "mrplip_core.model.export",
    "magnification_levels": "mrplip_core.model.export",
    "save_export": "mrplip_core.model.export",
    "ALL_HEADS": "mrplip_core.model.mrplip",
    "MRPLIPModel": "mrplip_core.model.mrplip",
    "ModelDims": "mrplip_core.model.settings",
    "ModelSettings": "mrplip_core.model.settings",
    "build_text_encoder": "mrplip_core.model.text",
    "bundled_minilm_dir": "mrplip_core.model.text",
    "load_tokenizer": "mrplip_core.model.text",
}


__getattr__ = lazy_attributes(__name__, _LAZY)
