"""Labelled tiles cut from annotated regions: an evaluation tile set from slides with region GeoJSONs.

A slide whose regions are annotated (level-0 px polygons with a ``kind``: the planted cohort's
``regions/{slide}.geojson``, or a QuPath export) gives labelled tiles for the evaluation stage's
``evaluation.datasets`` (a CSV of ``path,label``): tiles on a grid over the slide, each labelled
with the kind covering most of it (``wsi.regions.patch_truth``), kept when that kind covers at
least ``min_fraction`` of the tile. Slides held out of pretraining make a held-out tile set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from mrplip_core.io.atomic import atomic_path, write_text
from mrplip_core.io.names import safe_filename
from mrplip_core.wsi.magnification import magnification_to_mpp
from mrplip_core.wsi.regions import BACKGROUND, patch_truth
from mrplip_core.wsi.slide import Slide


@dataclass(frozen=True)
class RegionTile:
    """One tile: its level-0 box (top-left ``x``, ``y`` and side ``size``, level-0 px), the kind
    covering most of it and that kind's share of the box (0..1)."""

    slide_id: str
    x: int
    y: int
    size: int
    kind: str
    fraction: float


def region_tiles(
    slide: Slide,
    regions: Mapping[str, Any] | str | Path,
    *,
    magnification: float,
    tile_px: int,
    min_fraction: float = 0.9,
    per_kind: int | None = None,
    seed: int = 0,
) -> list[RegionTile]:
    """Tiles of ``tile_px`` px at ``magnification`` (x, 10 / um per px) on a non-overlapping grid
    over ``slide``, each labelled with the region kind covering at least ``min_fraction`` of it
    (tiles over glass or across a border are left out); at most ``per_kind`` per kind, drawn with
    ``seed`` (None: all). Returned in grid order (row by row)."""
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    size = int(round(tile_px * magnification_to_mpp(magnification) / slide.mpp))  # level-0 px per tile side
    if size < 1:
        raise ValueError(f"slide {slide.slide_id!r}: {tile_px} px at {magnification:g}x is under one level-0 px")
    w, h = slide.info.width, slide.info.height
    ys, xs = np.mgrid[0:h - size + 1:size, 0:w - size + 1:size]
    boxes = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, size)], axis=1)
    truth = patch_truth(boxes, regions, downsample=max(1.0, size / 32))
    keep = (truth["kind"] != BACKGROUND).to_numpy() & (truth["fraction"].to_numpy() >= min_fraction)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for kind in sorted(set(truth["kind"][keep])):
        idx = np.flatnonzero(keep & (truth["kind"] == kind).to_numpy())
        if per_kind is not None and len(idx) > per_kind:
            idx = np.sort(rng.choice(idx, per_kind, replace=False))
        chosen += idx.tolist()
    return [RegionTile(slide.slide_id, int(boxes[i, 0]), int(boxes[i, 1]), size, str(truth["kind"][i]),
                       float(truth["fraction"][i])) for i in sorted(chosen)]


def write_tile_set(slides: Sequence[tuple[Slide, Mapping[str, Any] | str | Path]], out: str | Path, *,
                   magnification: float, tile_px: int, min_fraction: float = 0.9, per_kind: int | None = None,
                   seed: int = 0) -> pd.DataFrame:
    """Cut :func:`region_tiles` from every ``(slide, regions)`` and write them as an evaluation
    tile set: ``out/{kind}/{slide}_{x}_{y}.png`` (``tile_px`` px, RGB) and ``out/labels.csv``
    (``path`` relative to ``out``, ``label``, ``slide_id``, level-0 ``x``, ``y``, ``size``,
    ``fraction``), every file written atomically. Returns the table. A kind or slide id that is
    not a safe file name is made one in the path (:func:`~mrplip_core.io.names.safe_filename`);
    ``label`` and ``slide_id`` keep it as it is."""
    out = Path(out)
    rows = []
    for k, (slide, regions) in enumerate(slides):
        for t in region_tiles(slide, regions, magnification=magnification, tile_px=tile_px,
                              min_fraction=min_fraction, per_kind=per_kind, seed=seed + k):
            rel = Path(safe_filename(t.kind)) / safe_filename(f"{t.slide_id}_{t.x}_{t.y}.png")
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out / rel) as tmp:
                Image.fromarray(slide.read_region(t.x, t.y, t.size, tile_px)).save(tmp, format="PNG")
            rows.append({"path": rel.as_posix(), "label": t.kind, "slide_id": t.slide_id, "x": t.x, "y": t.y,
                         "size": t.size, "fraction": round(t.fraction, 4)})
    df = pd.DataFrame(rows, columns=["path", "label", "slide_id", "x", "y", "size", "fraction"])
    write_text(df.to_csv(index=False), out / "labels.csv")
    return df
