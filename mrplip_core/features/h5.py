"""Self-describing HDF5 for features: attrs conversion, string datasets, a reader.

Layout of ``results/features/{encoder}/{slide}.h5`` (image)::

    /                 attrs: format, slide_id, status (ok | empty | failed), reason/error,
                             n_patches, magnifications, encoder attrs, run attrs
    /5x/features      (N, D) float16, rows in tile-manifest order
    /5x/patch_ids     (N,) utf-8
    /5x/rows          (N,) int64, row of each patch in results/tiles/{slide}.parquet
    /5x/coords        (N, 2) int64, level-0 top-left x, y
    /5x               attrs: magnification, n, size (level-0 px), patch_px, mpp + encoder attrs

Layout of ``results/text_features/{encoder}/{slide}.h5`` (text)::

    /keywords/bag_id, /keywords/keyword, /keywords/features (K, D) float16
    /captions/patch_id, /captions/features (M, D) float16
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import mrplip_core

IMAGE_FORMAT = "mrplip.image_features/1"
TEXT_FORMAT = "mrplip.text_features/1"
STRING = h5py.string_dtype("utf-8")


def package_versions(*names: str) -> dict[str, str]:
    """``{"package_version": mrplip, "<name>_version": ...}`` for the libraries that made a file."""
    import torch

    out = {"package": "mrplip", "package_version": mrplip_core.__version__, "torch_version": str(torch.__version__)}
    for name in ("h5py", *names):
        try:
            out[f"{name.replace('-', '_')}_version"] = version(name)
        except PackageNotFoundError:
            out[f"{name.replace('-', '_')}_version"] = "not installed"
    return out


def set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    """Write attrs, converting None to "", lists to arrays and mappings to JSON strings."""
    for key, value in attrs.items():
        if value is None:
            value = ""
        elif isinstance(value, Mapping):
            value = json.dumps(dict(value), sort_keys=True)
        elif isinstance(value, (list, tuple)):
            value = np.asarray(value) if value and not isinstance(value[0], str) else np.asarray(value, dtype=STRING)
        obj.attrs[key] = value


def strings(values: Any) -> np.ndarray:
    """A 1-D object array of Python str, ready for a utf-8 string dataset."""
    return np.asarray([str(v) for v in values], dtype=object)


def write_strings(group: h5py.Group, name: str, values: Any) -> None:
    group.create_dataset(name, data=strings(values), dtype=STRING)


def write_features(group: h5py.Group, features: np.ndarray) -> None:
    """(N, D) features as float16, chunked by rows (N may be 0)."""
    feats = np.asarray(features, dtype=np.float16)
    chunks = (min(len(feats), 1024), feats.shape[1]) if feats.size else None
    group.create_dataset("features", data=feats, chunks=chunks)


def read_image_features(path: str | Path, magnification: str) -> tuple[np.ndarray, list[str]]:
    """``(features (N, D) float16, patch_ids)`` of one magnification group (e.g. "10x")."""
    with h5py.File(path, "r") as f:
        if magnification not in f:
            raise KeyError(f"{path}: no group {magnification!r}; groups: {sorted(f)}")
        g = f[magnification]
        return g["features"][()], list(g["patch_ids"].asstr()[()])
