"""Text features of one slide: its keywords and full captions through a frozen text encoder.

Inputs (written by the captions stage):
- ``results/captions/{slide}.parquet``: one row per caption, columns ``patch_id``, ``caption``
  (null where captioning failed: such rows are left out and counted in ``n_captions_missing``);
- ``results/keywords/{slide}.parquet``: one row per keyword of a textual bag, columns
  ``bag_id``, ``keyword``, ``patch_ids`` (the patches whose captions gave it).

Output ``results/text_features/{encoder}/{slide}.h5`` (atomically): group ``keywords``
(``bag_id``, ``keyword``, ``features``) and group ``captions`` (``patch_id``, ``features``),
rows in the input files' order. Identical strings are encoded once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from mrplip_core.encoders import get_spec
from mrplip_core.encoders.runtime import resolve_device, resolve_precision
from mrplip_core.encoders.text import TextEncoder, load_text_encoder
from mrplip_core.features.h5 import TEXT_FORMAT, package_versions, set_attrs, write_features, write_strings
from mrplip_core.features.settings import FeatureSettings
from mrplip_core.io.atomic import atomic_path

CAPTION_COLUMNS = ("patch_id", "caption")
KEYWORD_COLUMNS = ("bag_id", "keyword")


def encode_unique(encoder: TextEncoder, texts: list[str], **kw: Any) -> np.ndarray:
    """Embed ``texts`` computing each distinct string once; (len(texts), D) float32."""
    if not texts:
        return np.zeros((0, encoder.dim), np.float32)
    uniq, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    return encoder.encode(list(uniq), **kw)[inverse.reshape(-1)]


def _read(path: str | Path, columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.read_parquet(path)
    missing = set(columns) - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {list(df.columns)}")
    return df


def extract_text_features(
    slide_id: str,
    captions: str | Path,
    keywords: str | Path,
    out: str | Path,
    settings: FeatureSettings,
    *,
    encoder: TextEncoder | None = None,
) -> dict[str, Any]:
    """Encode one slide's keywords and captions into ``out`` (HDF5, written atomically).

    ``encoder`` defaults to ``settings.text_encoder`` with its configured weights. Empty
    inputs (a failed slide) give groups with zero rows and ``status: empty``.
    Returns a summary (counts, distinct strings, truncated texts, seconds).
    """
    t0 = time.perf_counter()
    cap = _read(captions, CAPTION_COLUMNS)
    kw = _read(keywords, KEYWORD_COLUMNS)
    n_failed = int(cap["caption"].isna().sum())  # the captioner records failed patches as null
    cap = cap[cap["caption"].notna()].reset_index(drop=True)
    kw = kw[kw["keyword"].notna()].reset_index(drop=True)
    if encoder is None:
        spec = get_spec(settings.text_encoder)
        encoder = load_text_encoder(
            spec, settings.weights_for(spec.name, spec.weights_key), allow_random_init=settings.allow_random_init
        )
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, encoder.spec, device)
    opts = {"batch_size": settings.text_batch_size, "device": device, "precision": precision}
    kw_texts = kw["keyword"].astype(str).tolist()
    cap_texts = cap["caption"].astype(str).tolist()
    kw_feats = encode_unique(encoder, kw_texts, **opts)
    cap_feats = encode_unique(encoder, cap_texts, **opts)
    counts = {
        "n_keywords": len(kw_texts),
        "n_captions": len(cap_texts),
        "n_captions_missing": n_failed,
        "n_distinct_keywords": len(set(kw_texts)),
        "n_distinct_captions": len(set(cap_texts)),
        "n_truncated_keywords": sum(n > encoder.max_tokens for n in encoder.count_tokens(sorted(set(kw_texts)))),
        "n_truncated_captions": sum(n > encoder.max_tokens for n in encoder.count_tokens(sorted(set(cap_texts)))),
    }
    empty = not kw_texts and not cap_texts
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        g = f.create_group("keywords")
        write_strings(g, "bag_id", kw["bag_id"])
        write_strings(g, "keyword", kw_texts)
        write_features(g, kw_feats)
        set_attrs(g, {**encoder.attrs(), "n": len(kw_texts)})
        g = f.create_group("captions")
        write_strings(g, "patch_id", cap["patch_id"])
        write_features(g, cap_feats)
        set_attrs(g, {**encoder.attrs(), "n": len(cap_texts)})
        set_attrs(f, {
            "format": TEXT_FORMAT,
            "slide_id": slide_id,
            "captions": str(captions),
            "keywords": str(keywords),
            "features_dtype": "float16",
            **encoder.attrs(),
            **package_versions(*({"hf": ("transformers",), "open_clip": ("open_clip_torch",)}.get(encoder.spec.family, ()))),
            "device": str(device),
            "precision": precision,
            **counts,
            "status": "empty" if empty else "ok",
            "reason": "no keywords and no captions for this slide" if empty else "",
            "elapsed_s": round(time.perf_counter() - t0, 3),
        })
    return {"slide_id": slide_id, "status": "empty" if empty else "ok", "encoder": encoder.spec.name, **counts}
