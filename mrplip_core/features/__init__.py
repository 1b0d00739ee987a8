"""Feature extraction: patches and texts through frozen encoders into per-slide HDF5.

    from mrplip_core.features import FeatureSettings, extract_image_features, extract_text_features

The torch-using modules are imported on first use, so ``mrplip --help`` stays fast.
"""

from __future__ import annotations

from mrplip_core.features.settings import FeatureSettings
from mrplip_core.lazy import lazy_attributes

__all__ = ["FeatureSettings", "PatchDataset", "ShardPatches", "encode_patches", "encode_shard", "extract_image_features",
           "extract_image_slides", "extract_text_features"]

_LAZY = {
    "PatchDataset": "mrplip_core.features.dataset",
    "ShardPatches": "mrplip_core.features.dataset",
    "encode_patches": "mrplip_core.features.image",
    "encode_shard": "mrplip_core.features.image",
    "extract_image_slides": "mrplip_core.features.image",
    "extract_image_features": "mrplip_core.features.image",
    "extract_text_features": "mrplip_core.features.text",
}


__getattr__ = lazy_attributes(__name__, _LAZY)
