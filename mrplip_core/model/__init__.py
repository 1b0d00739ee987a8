"""The MR-PLIP model over frozen patch features, and the loader of trained runs.

``load(run_dir)`` returns an object with ``.encode_image(features, magnification)`` and
``.encode_text(texts)`` (L2-normalised embeddings in the ITC space) for evaluation.
"""

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
