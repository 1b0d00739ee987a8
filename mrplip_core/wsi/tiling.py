"""The tiles stage for one slide: open, detect tissue, choose parents, build the quad-tree.

Writes, each atomically:
- ``manifest``: ``results/tiles/{slide}.parquet`` (one row per patch, MANIFEST_COLUMNS);
- ``geojson``: ``results/tissue/{slide}.geojson`` (tissue polygons, level-0 px, QuPath);
- ``qc``: ``results/tissue/{slide}.png`` (thumbnail, mask outline, chosen parents);
- ``record``: ``results/slides/{slide}.json`` (slide metadata, status, error, reason, counts).

A slide's ``status`` is one of:
- ``ok``: at least one parent; ``error`` and ``reason`` are null.
- ``no_parents``: the slide opened and was tiled, but no parent-sized box of its grid has
  ``tiling.min_tissue_fraction`` tissue (or the slide is smaller than one box). ``reason``
  says so with the numbers (slide and parent size in mm, boxes, best tissue fraction,
  threshold); ``error`` is null. The manifest has zero rows, the QC image shows the mask.
  Not a failure of the slide file, so ``failures_fatal`` does not raise for it.
- ``failed``: the slide cannot be used (missing file, corrupt, no mpp, below the parent
  magnification); ``error`` names the slide and the cause, the other outputs are written
  empty (an error card as QC image), so the rest of the cohort finishes. With
  ``failures_fatal`` the error is raised instead.
Trouble of the machine (a full disk, an I/O error: :func:`mrplip_core.io.errors.machine_trouble`)
is never recorded: it is raised, the job fails and no record is written.
Later stages treat every status but ``ok`` alike: empty outputs for that slide.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openslide

from mrplip_core import __version__
from mrplip_core.io.atomic import atomic_path, write_parquet, write_text
from mrplip_core.io.errors import machine_trouble
from mrplip_core.wsi.hierarchy import (
    TilingError,
    TilingParams,
    build_manifest,
    empty_manifest,
    integral_image,
    no_parents_reason,
    parent_grid,
    plan_for_slide,
    select_parents,
)
from mrplip_core.wsi.slide import Slide, SlideError
from mrplip_core.wsi.tissue import TissueParams, detect_tissue, draw_qc, error_card, mask_to_geojson

#: Errors that mean "this slide cannot be used", recorded rather than raised.
SLIDE_FAILURES = (SlideError, TilingError, openslide.OpenSlideError, OSError)


@dataclass(frozen=True)
class TilesSettings:
    """Everything the tiles stage reads from the config (keys ``wsi`` and ``tiling``)."""

    thumbnail_mpp: float = 8.0  # um/px of the overview used for tissue detection
    mpp_fallback: float | None = None  # um/px when neither table nor file gives one
    failures_fatal: bool = False  # raise instead of recording a failed slide
    tissue: TissueParams = field(default_factory=TissueParams)
    tiling: TilingParams = field(default_factory=TilingParams)

    @classmethod
    def from_sections(cls, sections: dict[str, Any]) -> TilesSettings:
        """From the config sections ``wsi``, ``mpp_fallback``, ``failures_fatal``, ``tissue`` and
        ``tiling`` (absent or None: defaults). ``wsi.slides_per_job`` is the plan's, not a tile's."""
        wsi = {k: v for k, v in (sections.get("wsi") or {}).items() if k != "slides_per_job"}
        flat = {**wsi, "tissue": sections.get("tissue") or {}, "tiling": sections.get("tiling") or {}}
        for key in ("mpp_fallback", "failures_fatal"):
            if sections.get(key) is not None:
                flat[key] = sections[key]
        return cls.from_dict(flat)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TilesSettings:
        """Build from the config's plain dict; unknown keys are an error naming them."""
        def make(kind: type, values: dict[str, Any], where: str) -> Any:
            names = {f.name for f in fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown key(s) in {where}: {sorted(unknown)}")
            if kind is TilingParams and "magnifications" in values:
                values = {**values, "magnifications": tuple(values["magnifications"])}
            return kind(**values)

        d = dict(d)
        tissue = make(TissueParams, d.pop("tissue", {}) or {}, "tissue")
        tiling = make(TilingParams, d.pop("tiling", {}) or {}, "tiling")
        return make(cls, {**d, "tissue": tissue, "tiling": tiling}, "wsi")


@dataclass
class TilesOutputs:
    """Output paths of the tiles stage for one slide."""

    manifest: Path
    geojson: Path
    qc: Path
    record: Path


def tile_slide(
    slide_id: str,
    path: str | Path,
    outputs: TilesOutputs,
    settings: TilesSettings,
    *,
    table_mpp: float | None = None,
) -> dict[str, Any]:
    """Run the tiles stage for one slide and write its four outputs; return the record."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"slide_id": slide_id, "path": str(path), "status": "ok", "error": None, "reason": None}
    try:
        with Slide(path, slide_id, mpp=table_mpp, fallback_mpp=settings.mpp_fallback) as slide:
            record.update(slide.info.to_record())
            record.update(_tile_open_slide(slide, outputs, settings))
    except SLIDE_FAILURES as exc:
        # a no_parents slide raised nothing: it is never fatal. A full disk or an I/O error is
        # the machine's trouble, not the slide's: the job fails (and is retried), nothing is recorded
        if settings.failures_fatal or machine_trouble(exc):
            raise
        message = str(exc) if slide_id in str(exc) else f"slide {slide_id!r}: {exc}"
        record.update(status="failed", error=message)
        write_parquet(empty_manifest(), outputs.manifest)
        write_text(json.dumps(_feature_collection([], slide_id)), outputs.geojson)
        _write_png(error_card(slide_id, message), outputs.qc)
    record["elapsed_s"] = round(time.perf_counter() - t0, 3)
    record["mrplip_version"] = __version__
    write_text(json.dumps(record, indent=1, default=_json_default), outputs.record)
    return record


def _tile_open_slide(slide: Slide, outputs: TilesOutputs, settings: TilesSettings) -> dict[str, Any]:
    info, params = slide.info, settings.tiling
    plan = plan_for_slide(info.slide_id, info.mpp, info.objective, params)
    thumb, downsample = slide.thumbnail(settings.thumbnail_mpp)
    mask = detect_tissue(thumb, info.mpp * downsample, settings.tissue)
    ii = integral_image(mask)
    parents = select_parents(info.slide_id, info.width, info.height, plan.parent_size, ii, downsample, params)
    read_levels = {
        m: slide.best_level(plan.parent_size / 2**d / params.patch_px) for m, d in zip(plan.magnifications, plan.depths)
    }
    manifest = build_manifest(
        info.slide_id, info.mpp, parents, plan, ii, downsample, read_levels, params.patch_px
    )
    write_parquet(manifest, outputs.manifest)
    write_text(json.dumps(mask_to_geojson(mask, downsample, info.slide_id)), outputs.geojson)
    boxes = [(x / downsample, y / downsample, plan.parent_size / downsample, plan.parent_size / downsample)
             for x, y in zip(parents["x"], parents["y"])]
    _write_png(draw_qc(thumb, mask, boxes, [str(i) for i in range(len(boxes))]), outputs.qc)
    outcome: dict[str, Any] = {}
    if parents.empty:  # a readable slide without a parent: its own status, never raised (see the module doc)
        grid = parent_grid(info.width, info.height, plan.parent_size, ii, downsample)
        reason = no_parents_reason(info.width, info.height, info.mpp, plan.parent_size, grid, params)
        outcome = {"status": "no_parents", "reason": f"slide {info.slide_id!r}: {reason}"}
    return {
        **outcome,
        "magnifications": list(plan.magnifications),
        "skipped_magnifications": list(plan.skipped),
        "parent_size": plan.parent_size,
        "n_parents": int(len(parents)),
        "n_patches": int(len(manifest)),
        "tissue_fraction": float(mask.mean()) if mask.size else 0.0,
        "thumbnail_downsample": downsample,
    }


def _feature_collection(features: list[dict[str, Any]], slide_id: str) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features, "properties": {"slide_id": slide_id}}


def _write_png(rgb: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"PNG encoding failed for {path}")
        tmp.write_bytes(buf.tobytes())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
