"""Frozen-encoder features of an evaluation tile set, cached in HDF5.

``results/eval/features/{encoder}/{dataset}.h5`` is computed once per (encoder, dataset)
and read by the evaluation of the baseline and of every pretraining run on that encoder::

    /features   (N, D) float32, rows in dataset order
    /paths      (N,) utf-8, tile paths relative to the dataset's CSV folder / root folder
    /labels     (N,) utf-8
    attrs: format, dataset, source, n, mpp, magnification, encoder attrs (weights digest,
           input px, mean/std, device, precision)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mrplip_core.evaluation.datasets import TileDataset
from mrplip_core.evaluation.embedders import FrozenImageEncoder
from mrplip_core.features.h5 import STRING, set_attrs, strings
from mrplip_core.io.atomic import atomic_path

TILE_FEATURES_FORMAT = "mrplip.eval_tile_features/1"


def compute_tile_features(dataset: TileDataset, encoder: FrozenImageEncoder, out: str | Path,
                          batch_size: int | None = None, read_threads: int = 4) -> dict[str, Any]:
    """Run every tile through ``encoder`` and write ``out`` atomically; returns a summary."""
    batches = dataset.batches(batch_size or encoder.batch_size, threads=read_threads)
    feats = np.concatenate([encoder(batch) for batch in batches]) if len(dataset) else np.zeros((0, encoder.dim))
    if not np.isfinite(feats).all():
        raise FloatingPointError(f"encoder {encoder.name!r} gave non-finite features on dataset {dataset.name!r}")
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float32))
        f.create_dataset("paths", data=strings(dataset.relative_paths()), dtype=STRING)
        f.create_dataset("labels", data=strings(dataset.labels), dtype=STRING)
        set_attrs(f, {**encoder.attrs(), "format": TILE_FEATURES_FORMAT, "dataset": dataset.name,
                      "source": dataset.source, "n": len(dataset), "mpp": dataset.mpp,
                      "magnification": dataset.magnification})
    return {"dataset": dataset.name, "encoder": encoder.name, "n": len(dataset), "dim": int(feats.shape[1]), "out": str(out)}


def read_tile_features(path: str | Path, dataset: TileDataset) -> np.ndarray:
    """(N, D) float32 features of ``dataset`` from ``path``; a file for other tiles is an error."""
    with h5py.File(path, "r") as f:
        paths = list(f["paths"].asstr()[()])
        labels = list(f["labels"].asstr()[()])
        feats = f["features"][()].astype(np.float32)
    if paths != dataset.relative_paths() or labels != list(dataset.labels):
        raise ValueError(f"{path} was computed for other tiles than dataset {dataset.name!r} ({dataset.source}); "
                         "delete it to recompute")
    return feats


def tile_features_encoder(path: str | Path) -> str:
    """Registry name of the encoder that made a tile-features file."""
    with h5py.File(path, "r") as f:
        return str(f.attrs.get("encoder", ""))
