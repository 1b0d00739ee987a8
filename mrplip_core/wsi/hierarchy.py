"""Hierarchical multi-magnification tiling: parents at a low magnification, quad-tree children.

A *visual bag* is one parent patch (default 512 px at 5x) and all its descendants: 4 patches
at 10x, 16 at 20x, 64 at 40x, each ``patch_px`` x ``patch_px`` at its own magnification and
covering exactly a quarter (in area) of its parent's level-0 box.

Geometry is in level-0 px. The parent's level-0 side is ``patch_px * (10/parent_mag) / mpp``
rounded to a multiple of ``2**depth`` (depth = number of halvings down to the highest
magnification), so every child box is an integer number of level-0 px and the children tile
the parent exactly. The rounding changes the effective resolution by well under 1 %; each
row records its effective ``mpp`` (um per output px).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from mrplip_core.wsi.magnification import format_magnification, magnification_to_mpp

Selection = Literal["random", "most_tissue", "all"]
MissingPolicy = Literal["skip", "fail"]

#: Columns of ``results/tiles/{slide}.parquet``, in order, with their dtypes.
MANIFEST_COLUMNS: dict[str, str] = {
    "slide_id": "string",
    "patch_id": "string",  # "{slide}_{mag}x_x{x}_y{y}": stable across reruns with the same config
    "parent_id": "string",  # patch_id of the patch one magnification down; null for bag roots
    "bag_id": "string",  # patch_id of the bag's root (the parent patch)
    "magnification": "float64",  # x (10 / um per px)
    "depth": "int8",  # 0 for the parent, 1 for its children, ...
    "x": "int64",  # level-0 px, top-left
    "y": "int64",  # level-0 px, top-left
    "size": "int64",  # level-0 px, square side
    "patch_px": "int32",  # output side in px at the patch's magnification
    "mpp": "float64",  # effective um per output px (size * slide_mpp / patch_px)
    "read_level": "int16",  # pyramid level read before resizing
    "tissue_fraction": "float32",  # fraction of the box covered by the tissue mask, 0..1
}


class TilingError(ValueError):
    """The tiling configuration cannot be applied to a slide (message names the slide)."""


@dataclass(frozen=True)
class TilingParams:
    """How parents are chosen and children made.

    magnifications: every magnification (x) to produce, lowest first is the parent
        magnification; each must be the previous one times a power of two (5, 10, 20, 40).
    patch_px: side of every patch in output px at its own magnification.
    n_parents: parents per slide (the paper: 20); ignored with ``selection='all'``.
    selection: 'random' (seeded), 'most_tissue' (highest tissue fraction first), or 'all'.
    min_tissue_fraction: a parent is a candidate only when this fraction of its box is tissue.
    seed: random selection seed (combined with the slide id so slides differ but reruns don't).
    missing_magnification: a slide scanned below a wanted magnification either drops that
        magnification and records it ('skip') or fails ('fail').
    """

    magnifications: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)
    patch_px: int = 512
    n_parents: int = 20
    selection: Selection = "random"
    min_tissue_fraction: float = 0.5
    seed: int = 0
    missing_magnification: MissingPolicy = "skip"

    def __post_init__(self) -> None:
        mags = tuple(float(m) for m in self.magnifications)
        if not mags or list(mags) != sorted(set(mags)):
            raise TilingError(f"magnifications must be strictly increasing, got {self.magnifications}")
        for lo, hi in zip(mags, mags[1:]):
            ratio = hi / lo
            if abs(ratio - 2 ** round(math.log2(ratio))) > 1e-9 or ratio < 2:
                raise TilingError(f"magnification {hi:g}x is not {lo:g}x times a power of two")
        object.__setattr__(self, "magnifications", mags)


@dataclass(frozen=True)
class TilingPlan:
    """Magnifications a given slide supports, and the level-0 geometry of a parent."""

    magnifications: tuple[float, ...]  # kept, lowest first
    skipped: tuple[float, ...]  # dropped because the scan is below them
    parent_size: int  # level-0 px side of a parent box
    depths: tuple[int, ...]  # quad-tree depth of each kept magnification


def plan_for_slide(slide_id: str, slide_mpp: float, objective: float, params: TilingParams) -> TilingPlan:
    """Decide which magnifications apply to a slide of ``slide_mpp`` um/px (``objective`` x).

    A magnification above the slide's objective (its nominal, banded magnification) is
    skipped or fails per ``params.missing_magnification``. The parent magnification itself
    is always required.
    """
    parent_mag = params.magnifications[0]
    kept = [m for m in params.magnifications if m <= objective + 1e-9]
    skipped = tuple(m for m in params.magnifications if m > objective + 1e-9)
    if skipped and params.missing_magnification == "fail":
        raise TilingError(
            f"slide {slide_id!r} is scanned at {objective:g}x ({slide_mpp:.4f} um/px), below "
            f"{', '.join(format_magnification(m) for m in skipped)} "
            "(tiling.missing_magnification is 'fail')"
        )
    if not kept:
        raise TilingError(f"slide {slide_id!r} at {objective:g}x ({slide_mpp:g} um/px) is below the parent "
                          f"magnification {parent_mag:g}x; check its mpp")
    depths = tuple(int(round(math.log2(m / parent_mag))) for m in kept)
    unit = 2 ** max(depths)
    exact = params.patch_px * magnification_to_mpp(parent_mag) / slide_mpp
    parent_size = max(unit, int(round(exact / unit)) * unit)
    return TilingPlan(tuple(kept), skipped, parent_size, depths)


def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table of a boolean mask, shape (H+1, W+1), for O(1) box sums."""
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1, out=ii[1:, 1:])
    return ii


def box_fractions(ii: np.ndarray, x: np.ndarray, y: np.ndarray, size: int, downsample: float) -> np.ndarray:
    """Tissue fraction of level-0 boxes ``(x, y, size)`` from a mask's integral image.

    ``downsample`` is level-0 px per mask px. Box edges are rounded to mask px; a box
    smaller than one mask px still covers at least one. Parts outside the mask count as
    background.
    """
    h, w = ii.shape[0] - 1, ii.shape[1] - 1
    x0 = np.clip(np.floor(x / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(y / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.maximum(np.ceil((x + size) / downsample).astype(np.int64), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.ceil((y + size) / downsample).astype(np.int64), y0 + 1), 0, h)
    inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    full_area = (np.ceil((x + size) / downsample) - np.floor(x / downsample)).clip(min=1) * (
        np.ceil((y + size) / downsample) - np.floor(y / downsample)
    ).clip(min=1)
    return (inside / full_area).astype(np.float32)


def _stable_rng(slide_id: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(slide_id.encode())])


def parent_grid(width: int, height: int, parent_size: int, ii: np.ndarray, downsample: float) -> pd.DataFrame:
    """Every parent-sized box fully inside the slide, the grid's origin at level-0 (0, 0).

    ``width``, ``height`` and ``parent_size`` are level-0 px; ``ii`` is the tissue mask's
    integral image at ``downsample`` level-0 px per mask px. Returns ``x``, ``y`` (level-0 px,
    row-major) and ``tissue_fraction`` (0..1) of each box: the parent candidates before the
    ``min_tissue_fraction`` threshold.
    """
    nx, ny = width // parent_size, height // parent_size
    gx, gy = np.meshgrid(np.arange(nx, dtype=np.int64) * parent_size, np.arange(ny, dtype=np.int64) * parent_size)
    xs, ys = gx.ravel(), gy.ravel()
    frac = box_fractions(ii, xs, ys, parent_size, downsample) if xs.size else np.zeros(0, np.float32)
    return pd.DataFrame({"x": xs, "y": ys, "tissue_fraction": frac})


def select_parents(
    slide_id: str,
    width: int,
    height: int,
    parent_size: int,
    ii: np.ndarray,
    downsample: float,
    params: TilingParams,
) -> pd.DataFrame:
    """The chosen parents among the boxes of :func:`parent_grid` with enough tissue.

    Returns the chosen parents as a frame with ``x``, ``y`` (level-0 px) and
    ``tissue_fraction``, in row-major order; empty when no box reaches
    ``params.min_tissue_fraction`` (see :func:`no_parents_reason`).
    """
    grid = parent_grid(width, height, parent_size, ii, downsample)
    cand = grid[grid["tissue_fraction"] >= params.min_tissue_fraction].reset_index(drop=True)
    if params.selection == "all" or len(cand) <= params.n_parents:
        chosen = cand
    elif params.selection == "most_tissue":
        chosen = cand.sort_values(["tissue_fraction", "y", "x"], ascending=[False, True, True]).head(params.n_parents)
    elif params.selection == "random":
        idx = _stable_rng(slide_id, params.seed).choice(len(cand), size=params.n_parents, replace=False)
        chosen = cand.iloc[np.sort(idx)]
    else:
        raise TilingError(f"unknown tiling.selection {params.selection!r}")
    return chosen.sort_values(["y", "x"]).reset_index(drop=True)


def no_parents_reason(
    width: int, height: int, slide_mpp: float, parent_size: int, grid: pd.DataFrame, params: TilingParams
) -> str:
    """Why a slide got no parent, for its record: the slide's and a parent's size in mm,
    how many parent-sized boxes the grid holds (``grid``: :func:`parent_grid`), how many
    reach ``tiling.min_tissue_fraction``, and the best box's tissue fraction.

    ``width``, ``height`` and ``parent_size`` are level-0 px, ``slide_mpp`` um/px.
    """
    mm = slide_mpp / 1000.0
    parent_mag = format_magnification(params.magnifications[0])
    slide_mm = f"{width * mm:.2f} x {height * mm:.2f} mm"
    box_mm = f"{parent_size * mm:.2f} x {parent_size * mm:.2f} mm"
    threshold = f"tiling.min_tissue_fraction {params.min_tissue_fraction:g}"
    if grid.empty:
        return f"no {parent_mag} parent: the slide ({slide_mm}) is smaller than one parent box ({box_mm}), so it has no candidate"
    passed = int((grid["tissue_fraction"] >= params.min_tissue_fraction).sum())
    n = len(grid)
    return (f"no {parent_mag} parent: the slide ({slide_mm}) holds {n} parent box{'es' if n != 1 else ''} of {box_mm}, "
            f"{passed} with tissue fraction >= {threshold}; the best has {float(grid['tissue_fraction'].max()):.2f}")


def patch_id(slide_id: str, magnification: float, x: int, y: int) -> str:
    """Stable patch id: slide, magnification and level-0 top-left corner."""
    return f"{slide_id}_{format_magnification(magnification)}_x{int(x)}_y{int(y)}"


def build_manifest(
    slide_id: str,
    slide_mpp: float,
    parents: pd.DataFrame,
    plan: TilingPlan,
    ii: np.ndarray,
    downsample: float,
    read_levels: dict[float, int],
    patch_px: int,
) -> pd.DataFrame:
    """Expand chosen parents into their quad-trees; one row per patch (MANIFEST_COLUMNS).

    Rows are ordered by bag (parents in row-major order), then depth, then y, then x.
    ``read_levels`` maps each kept magnification to the pyramid level to read it from.
    """
    frames = []
    for mag, depth in zip(plan.magnifications, plan.depths):
        n = 2**depth
        size = plan.parent_size // n
        offs = np.arange(n, dtype=np.int64) * size
        oy, ox = np.meshgrid(offs, offs, indexing="ij")
        px = parents["x"].to_numpy(np.int64)[:, None] + ox.ravel()[None, :]
        py = parents["y"].to_numpy(np.int64)[:, None] + oy.ravel()[None, :]
        bag = np.repeat(np.arange(len(parents)), n * n)
        px, py = px.ravel(), py.ravel()
        bx = parents["x"].to_numpy(np.int64)[bag]
        by = parents["y"].to_numpy(np.int64)[bag]
        if depth == 0:
            parent_ids: list[str | None] = [None] * len(px)
        else:
            k = plan.depths.index(depth)
            up = plan.parent_size // 2 ** plan.depths[k - 1]  # side of the patch one level up
            prev_mag = plan.magnifications[k - 1]
            parent_ids = [
                patch_id(slide_id, prev_mag, x0 + (a - x0) // up * up, y0 + (b - y0) // up * up)
                for a, b, x0, y0 in zip(px, py, bx, by)
            ]
        frames.append(
            pd.DataFrame(
                {
                    "_bag": bag,
                    "slide_id": slide_id,
                    "patch_id": [patch_id(slide_id, mag, a, b) for a, b in zip(px, py)],
                    "parent_id": parent_ids,
                    "bag_id": [patch_id(slide_id, plan.magnifications[0], a, b) for a, b in zip(bx, by)],
                    "magnification": mag,
                    "depth": depth,
                    "x": px,
                    "y": py,
                    "size": size,
                    "patch_px": patch_px,
                    "mpp": size * slide_mpp / patch_px,
                    "read_level": read_levels[mag],
                    "tissue_fraction": box_fractions(ii, px, py, size, downsample) if len(px) else np.zeros(0, np.float32),
                }
            )
        )
    if not frames or len(parents) == 0:
        return empty_manifest()
    df = pd.concat(frames, ignore_index=True).sort_values(["_bag", "depth", "y", "x"], kind="stable")
    return df.drop(columns="_bag").astype(MANIFEST_COLUMNS).reset_index(drop=True)


def empty_manifest() -> pd.DataFrame:
    """A manifest with the right columns and dtypes and no rows (a failed or empty slide)."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MANIFEST_COLUMNS.items()})
