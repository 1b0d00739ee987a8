"""Text-to-region localisation on a slide: ``mrplip localize`` and the ``localize`` target.

For each (slide, query), with ``{model}`` = ``{family}-{run}`` (``pathflip-demo``) and
``{query}`` = :func:`query_key` of the text, below ``results/localize/{model}/{slide}/`` (or
``--out DIR/{slide}/``):

* ``{query}.parquet``: a row per patch of the slide at the model's magnifications: patch_id,
  level-0 px box ``x, y, w, h``, magnification (x), score, rank (1 = highest) and
  ``in_region``. Scores are the model's (:mod:`mrplip_core.use.models`): PathFLIP's heatmap
  (summing to 1 over the slide's patches) or MR-PLIP's patch-text cosine.
* ``{query}.geojson``: a GeoJSON FeatureCollection in level-0 px that QuPath imports (File >
  Import objects): one square ``detection`` per patch of the region (the ``top_fraction`` of the
  slide's patches with the highest scores, at least one), named by the query, classified as the
  query, with ``measurements`` score, rank and magnification.
* ``{query}.png``: the scores as a heatmap over the slide's thumbnail (at ``thumbnail_mpp``
  um/px, read through OpenSlide from the path in ``results/slides.parquet``), the region
  outlined. A slide without a readable slide file (a feature-level corpus, a moved file) is
  drawn on a blank grey canvas of the patches' extent instead, and the PNG says so.

``results/localize/{model}/summary.parquet`` (or ``--summary``) has a row per (slide, query):
status ``ok`` or ``failed``, the error naming the slide and file, and the files written; a
slide that fails (unknown id, no features) is recorded there and the others are done.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from mrplip_core.io.errors import machine_trouble
from mrplip_core.io.atomic import atomic_path, write_parquet, write_text
from mrplip_core.layout import RESULTS, Layout
from mrplip_core.use.models import UsableModel, check_queries
from mrplip_core.use.patches import SlideInputError, SlidePatches, read_slide_patches
from mrplip_core.use.settings import LocalizeSettings

SUMMARY_COLUMNS = ["model", "slide_id", "query", "query_key", "status", "error", "n_patches", "n_region",
                   "max_score", "background", "scores", "geojson", "heatmap"]
#: Longest side of the blank canvas (px) when a slide has no image to draw on.
CANVAS_PX = 1024
REGION_COLOUR = (255, 64, 32)  # RGB of the region's class in QuPath and its outline in the PNG


def query_key(text: str) -> str:
    """A file-safe, stable key of a query: its first words in lower case and 8 hex digits of
    its SHA-1 (``"Tumour cells."`` -> ``"tumour-cells-1b2c..."``); distinct texts, distinct keys."""
    slug = "-".join(re.findall(r"[a-z0-9]+", text.lower()))[:40].strip("-") or "query"
    return f"{slug}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def region_indices(scores: np.ndarray, top_fraction: float) -> np.ndarray:
    """Indices of the ``ceil(top_fraction * P)`` highest scores (at least one), best first."""
    n = max(1, math.ceil(float(top_fraction) * len(scores)))
    return np.argsort(-np.asarray(scores), kind="stable")[:n]


def scores_table(patches: SlidePatches, scores: np.ndarray, region: np.ndarray) -> pd.DataFrame:
    """The per-patch Parquet: patch_id, level-0 box (x, y, w, h), magnification, score, rank, in_region."""
    df = patches.table()
    df.insert(0, "slide_id", patches.slide_id)
    df["score"] = np.asarray(scores, dtype=np.float32)
    rank = np.empty(len(scores), dtype=np.int64)
    rank[np.argsort(-np.asarray(scores), kind="stable")] = np.arange(1, len(scores) + 1)
    df["rank"] = rank
    df["in_region"] = np.isin(np.arange(len(scores)), region)
    return df


def region_geojson(patches: SlidePatches, scores: np.ndarray, region: np.ndarray, query: str,
                   model: str) -> dict[str, Any]:
    """The region as a QuPath-readable FeatureCollection in level-0 px: a square Polygon per
    patch of ``region`` (``objectType: detection``, ``name``: the query, ``classification``: the
    query, ``measurements``: score, rank, magnification)."""
    features = []
    for rank, i in enumerate(region, start=1):
        x, y, s = int(patches.x[i]), int(patches.y[i]), int(patches.size[i])
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        features.append({
            "type": "Feature",
            "id": f"{patches.slide_id}/{query_key(query)}/{patches.patch_ids[i]}",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "name": query,
                "classification": {"name": query, "color": list(REGION_COLOUR)},
                "isLocked": False,
                "patch_id": str(patches.patch_ids[i]),
                "measurements": {"score": float(scores[i]), "rank": rank, "magnification": float(patches.magnification[i])},
            },
        })
    width, height = patches.extent
    return {"type": "FeatureCollection",
            "properties": {"slide_id": patches.slide_id, "query": query, "model": model, "coordinates": "level-0 px",
                           "n_patches": len(patches), "n_region": len(region), "patches_extent": [width, height]},
            "features": features}


def slide_background(results: str | Path, slide: str, extent: tuple[int, int],
                     thumbnail_mpp: float) -> tuple[np.ndarray, float, str]:
    """``(RGB image, level-0 px per image px, what it is)``: the slide's thumbnail at
    ``thumbnail_mpp`` um/px when ``results/slides.parquet`` gives a slide file OpenSlide opens,
    else a blank grey canvas covering ``extent`` (level-0 px) at most ``CANVAS_PX`` on a side."""
    table = Layout(results).slides_table
    if table.exists():
        df = pd.read_parquet(table)
        row = df[df["slide_id"].astype(str) == slide]
        if len(row) and isinstance(row["path"].iloc[0], str) and Path(row["path"].iloc[0]).exists():
            from mrplip_core.wsi.slide import Slide, SlideError

            mpp = row["mpp"].iloc[0] if "mpp" in row else None
            try:
                with Slide(row["path"].iloc[0], slide, mpp=None if pd.isna(mpp) else float(mpp)) as s:
                    thumb, downsample = s.thumbnail(thumbnail_mpp)
                return thumb, float(downsample), f"slide thumbnail at {thumbnail_mpp:g} um/px"
            except SlideError:
                pass
    width, height = extent
    downsample = max(1.0, max(width, height) / CANVAS_PX)
    canvas = np.full((max(1, math.ceil(height / downsample)), max(1, math.ceil(width / downsample)), 3), 235, np.uint8)
    return canvas, downsample, "blank canvas (no slide image)"


def heatmap_png(background: np.ndarray, downsample: float, note: str, patches: SlidePatches, scores: np.ndarray,
                region: np.ndarray, query: str) -> np.ndarray:
    """RGB image: each patch's box filled with its score (min-max over the slide, colour map
    JET, half transparent; coarse magnifications first, finer ones on top), the region's patches
    outlined, and a band above with the query and ``note``."""
    img = background.astype(np.float32)
    overlay = img.copy()
    covered = np.zeros(img.shape[:2], dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    lo, hi = float(s.min()), float(s.max())
    norm = (s - lo) / (hi - lo) if hi > lo else np.full_like(s, 0.5)
    colours = cv2.applyColorMap((norm * 255).astype(np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]
    h, w = img.shape[:2]

    def box(i: int) -> tuple[int, int, int, int]:
        x0, y0 = int(patches.x[i] / downsample), int(patches.y[i] / downsample)
        x1 = max(x0 + 1, int(round((patches.x[i] + patches.size[i]) / downsample)))
        y1 = max(y0 + 1, int(round((patches.y[i] + patches.size[i]) / downsample)))
        return min(x0, w - 1), min(y0, h - 1), min(x1, w), min(y1, h)

    for i in np.argsort(patches.magnification, kind="stable"):
        x0, y0, x1, y1 = box(int(i))
        overlay[y0:y1, x0:x1] = colours[i]
        covered[y0:y1, x0:x1] = True
    img[covered] = 0.5 * img[covered] + 0.5 * overlay[covered]
    out = img.clip(0, 255).astype(np.uint8)
    for i in region:
        x0, y0, x1, y1 = box(int(i))
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), REGION_COLOUR, 1)
    band = np.full((36, out.shape[1], 3), 255, np.uint8)
    text = query.encode("ascii", "replace").decode("ascii")
    cv2.putText(band, text[: max(8, out.shape[1] // 7)], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(band, f"{note}; score {lo:.3g}..{hi:.3g}", (4, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (80, 80, 80), 1,
                cv2.LINE_AA)
    return np.concatenate([band, out])


def write_png(rgb: np.ndarray, path: Path) -> Path:
    """Write an RGB uint8 image as PNG atomically."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return path


def output_paths(model: str, slide: str, key: str, results: str | Path = RESULTS,
                 out: str | Path | None = None) -> dict[str, Path]:
    """scores, geojson, heatmap of one (slide, query): the layout's, or the same names below ``out``."""
    layout = Layout(results)
    paths = {"scores": layout.localize_scores(model, slide, key), "geojson": layout.localize_geojson(model, slide, key),
             "heatmap": layout.localize_heatmap(model, slide, key)}
    if out is None:
        return paths
    base = layout.localize_dir(model)
    return {k: Path(out) / p.relative_to(base) for k, p in paths.items()}


def summary_path(model: str, results: str | Path = RESULTS, out: str | Path | None = None) -> Path:
    """The summary table: the layout's, or ``summary.parquet`` below ``out``."""
    layout = Layout(results)
    path = layout.localize_summary(model)
    return path if out is None else Path(out) / path.relative_to(layout.localize_dir(model))


def localize_slide(model: UsableModel, slide: str, queries: Sequence[str], settings: LocalizeSettings,
                   results: str | Path = RESULTS, out: str | Path | None = None) -> list[dict[str, Any]]:
    """Score, write and summarise every query on one slide; a summary row per query.

    Raises :class:`SlideInputError` (unknown slide, no features) and ``ValueError`` (an empty
    query) naming the slide or the query.
    """
    check_queries(queries)
    patches = read_slide_patches(results, model.image_encoder, slide, model.magnifications)
    scores = model.patch_scores(patches.features, patches.magnification, queries)
    if not np.isfinite(scores).all():
        raise FloatingPointError(f"slide {slide!r}: model {model.label} gave non-finite scores")
    background: tuple[np.ndarray, float, str] | None = None
    rows = []
    for q, query in enumerate(queries):
        key = query_key(query)
        paths = output_paths(model.label, slide, key, results, out)
        region = region_indices(scores[q], settings.top_fraction)
        df = scores_table(patches, scores[q], region)
        df.attrs = {"query": query, "model": model.label, "slide_id": slide, "coordinates": "level-0 px"}
        write_parquet(df, paths["scores"])
        write_text(json.dumps(region_geojson(patches, scores[q], region, query, model.label), indent=1) + "\n",
                   paths["geojson"])
        if background is None:
            background = slide_background(results, slide, patches.extent, settings.thumbnail_mpp)
        write_png(heatmap_png(*background, patches, scores[q], region, query), paths["heatmap"])
        rows.append({"model": model.label, "slide_id": slide, "query": query, "query_key": key, "status": "ok",
                     "error": "", "n_patches": len(patches), "n_region": len(region),
                     "max_score": float(scores[q].max()), "background": background[2],
                     **{k: str(v) for k, v in paths.items()}})
    return rows


def localize_slides(model: UsableModel, slides: Sequence[str], queries: Sequence[str], settings: LocalizeSettings,
                    results: str | Path = RESULTS, out: str | Path | None = None,
                    summary: str | Path | None = None) -> pd.DataFrame:
    """:func:`localize_slide` over ``slides``; a slide that fails is recorded (status
    ``failed``, the error naming it) and the rest are done. Writes and returns the summary."""
    check_queries(queries)
    rows: list[dict[str, Any]] = []
    for slide in slides:
        try:
            rows += localize_slide(model, slide, queries, settings, results, out)
        except (SlideInputError, OSError, ValueError, KeyError, FloatingPointError) as exc:
            if machine_trouble(exc):  # a full disk or an I/O error fails the verb
                raise
            rows += [{"model": model.label, "slide_id": slide, "query": q, "query_key": query_key(q),
                      "status": "failed", "error": str(exc), "n_patches": 0, "n_region": 0, "max_score": float("nan"),
                      "background": "", "scores": "", "geojson": "", "heatmap": ""} for q in queries]
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    write_parquet(df, Path(summary) if summary is not None else summary_path(model.label, results, out))
    return df

