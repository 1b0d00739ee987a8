"""Per-slide records (``results/slides/{slide}.json``) and reading patches back by id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mrplip_core.io.atomic import write_parquet
from mrplip_core.layout import TEMPLATES, Layout
from mrplip_core.wsi.slide import Slide
from mrplip_core.wsi.table import read_slide_table

#: Columns of ``results/slides.parquet`` (one row per slide of the table). ``status``: ok,
#: no_parents, failed or missing (see :mod:`mrplip_core.wsi.tiling`); ``error`` says why a
#: slide failed, ``reason`` why a readable slide has no parents; both null for ok slides.
SLIDES_COLUMNS = [
    "slide_id", "path", "status", "error", "reason", "vendor", "mpp", "mpp_source", "objective",
    "width", "height", "levels", "magnifications", "skipped_magnifications",
    "n_parents", "n_patches", "tissue_fraction", "elapsed_s",
]
#: Count columns: nullable integers, null for slides that failed before they were counted.
COUNT_COLUMNS = ("width", "height", "levels", "n_parents", "n_patches")


def _record_in(records_dir: str | Path, slide_id: str) -> Path:
    """``slide_id``'s record in a folder of records (the layout's ``slide_record`` below ``slide_records``)."""
    below = Path(TEMPLATES["slide_record"]).relative_to(TEMPLATES["slide_records"]).as_posix()
    return Path(records_dir) / below.format(slide=slide_id)


def read_record(records_dir: str | Path, slide_id: str) -> dict:
    """The JSON record the tiles stage wrote for ``slide_id``."""
    path = _record_in(records_dir, slide_id)
    if not path.exists():
        raise FileNotFoundError(f"no record for slide {slide_id!r}: {path} (run `snakemake tiles` first)")
    return json.loads(path.read_text())


def collect_slide_records(table: str | Path, records_dir: str | Path, out: str | Path) -> pd.DataFrame:
    """One row per slide of ``table`` from its record; written atomically to ``out``.

    Label columns of the slide table are carried over. A slide without a record is
    listed with status ``missing``. Counts are ``Int64`` (null where a slide failed).
    """
    slides = read_slide_table(table)
    rows = []
    for sid in slides.index:
        path = _record_in(records_dir, sid)
        rec = json.loads(path.read_text()) if path.exists() else {"slide_id": sid, "status": "missing",
                                                                 "error": f"no record at {path}"}
        rec.setdefault("path", slides.at[sid, "path"])
        rows.append({c: rec.get(c) for c in SLIDES_COLUMNS})
    df = pd.DataFrame(rows, columns=SLIDES_COLUMNS)
    labels = [c for c in slides.columns if c not in {"slide_id", "path", "mpp", "caption"}]  # captions: slide_captions.parquet
    for c in labels:
        df[c] = slides[c].to_numpy()
    for c in ("slide_id", "path", "status", "error", "reason", "vendor", "mpp_source"):
        df[c] = df[c].astype("string")
    for c in COUNT_COLUMNS:
        df[c] = df[c].astype("Int64")
    for c in ("mpp", "objective", "tissue_fraction", "elapsed_s"):
        df[c] = df[c].astype("float64")
    for c in ("magnifications", "skipped_magnifications"):
        df[c] = [list(v) if isinstance(v, list) else [] for v in df[c]]
    write_parquet(df, out)
    return df


def read_patch_image(results: str | Path | Layout, slide_id: str, patch_id: str) -> np.ndarray:
    """Read one patch exactly as the pipeline defines it: RGB uint8 (patch_px x patch_px).

    ``results``: the results folder (or its :class:`~mrplip_core.layout.Layout`) holding the
    slide's tile manifest and record.
    """
    layout = results if isinstance(results, Layout) else Layout(results)
    manifest = layout.tiles(slide_id)
    if not manifest.exists():
        raise FileNotFoundError(f"no tile manifest for slide {slide_id!r}: {manifest}")
    df = pd.read_parquet(manifest, filters=[("patch_id", "==", patch_id)])
    if df.empty:
        raise KeyError(f"patch {patch_id!r} not in {manifest}")
    row = df.iloc[0]
    rec = read_record(layout.slide_records, slide_id)
    with Slide(rec["path"], slide_id, mpp=rec["mpp"]) as slide:
        return slide.read_region(int(row.x), int(row.y), int(row["size"]), int(row.patch_px), level=int(row.read_level))
