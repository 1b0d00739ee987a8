"""Annotated regions of a slide: a label raster to GeoJSON and back, and each patch's region.

A region file is a GeoJSON FeatureCollection in level-0 px whose features are Polygons (first
ring the outline, further rings its holes) with a property ``kind`` naming the region's class
(``tumour``, ``stroma``, ...); several features may share a kind. It is what QuPath exports
for annotations, and what ``wsi/planted.py`` writes as the ground truth of a planted slide.
:func:`patch_truth` gives each patch of a tile manifest (or of a feature file's coords) the
kind that covers most of its level-0 box.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from mrplip_core.wsi.hierarchy import box_fractions, integral_image
from mrplip_core.wsi.tissue import mask_to_geojson

#: Feature property naming a region's class.
KIND = "kind"
#: ``patch_truth``'s label of a patch that no region covers (glass, or unannotated tissue).
BACKGROUND = "background"
_SUBPIXEL_BITS = 4  # fractional bits of the vertices handed to cv2.fillPoly


def labels_to_geojson(labels: np.ndarray, downsample: float, kinds: Sequence[str], slide_id: str) -> dict[str, Any]:
    """Region polygons of a label raster, in level-0 px.

    ``labels``: (H, W) int, index into ``kinds`` or -1 for no region, one value per cell of
    ``downsample`` level-0 px (cell ``(i, j)`` is centred on level-0 ``((j + 0.5) * downsample,
    (i + 0.5) * downsample)``). One Polygon feature per connected component of each kind, with
    properties ``kind``, ``objectType: annotation`` and a ``classification`` named after the
    kind (QuPath). Vertices are the centres of boundary cells, so a polygon lies within half a
    cell of the raster's boundary.
    """
    features: list[dict[str, Any]] = []
    for k, kind in enumerate(kinds):
        for i, feature in enumerate(mask_to_geojson(labels == k, downsample, f"{slide_id}/{kind}")["features"]):
            feature["properties"] = {
                KIND: kind,
                "objectType": "annotation",
                "name": f"{kind} {i + 1}",
                "classification": {"name": kind},
                "isLocked": False,
            }
            features.append(feature)
    return {
        "type": "FeatureCollection",
        "properties": {"slide_id": slide_id, "coordinates": "level-0 px", "kinds": list(kinds)},
        "features": features,
    }


def read_regions(path: str | Path) -> dict[str, Any]:
    """A region GeoJSON file; every feature must be a Polygon or MultiPolygon with a ``kind``
    (QuPath's annotations: their ``classification.name`` is taken as the kind)."""
    regions = json.loads(Path(path).read_text())
    for i, feature in enumerate(regions.get("features", [])):
        if not isinstance(feature.get("properties"), dict):
            feature["properties"] = {}
        props = feature["properties"]
        classification = props.get("classification")
        if KIND not in props and isinstance(classification, dict) and isinstance(classification.get("name"), str):
            props[KIND] = classification["name"]
        if feature.get("geometry", {}).get("type") not in ("Polygon", "MultiPolygon"):
            raise ValueError(f"{path}: feature {i} is not a Polygon or MultiPolygon")
        if not isinstance(feature.get("properties", {}).get(KIND), str):
            raise ValueError(f"{path}: feature {i} has no string property {KIND!r}")
    return regions


def region_kinds(regions: Mapping[str, Any]) -> list[str]:
    """The kinds of a region collection: its ``properties.kinds`` when given, else the
    features' kinds in order of first appearance."""
    given = regions.get("properties", {}).get("kinds")
    if given:
        return list(given)
    return list(dict.fromkeys(f["properties"][KIND] for f in regions["features"]))


def _polygons(geometry: Mapping[str, Any]) -> list[list[list[list[float]]]]:
    if geometry["type"] == "Polygon":
        return [geometry["coordinates"]]
    return list(geometry["coordinates"])


def region_masks(regions: Mapping[str, Any], shape: tuple[int, int], downsample: float) -> dict[str, np.ndarray]:
    """Each kind's area as a (H, W) bool raster of cells of ``downsample`` level-0 px
    (``shape`` = (H, W) cells; cell ``(i, j)`` is centred on level-0 ``((j + 0.5) *
    downsample, (i + 0.5) * downsample)``). Holes are left out (even-odd fill of each polygon's
    rings); where two kinds overlap both are set."""
    scale = 1 << _SUBPIXEL_BITS
    out = {kind: np.zeros(shape, np.uint8) for kind in region_kinds(regions)}
    for feature in regions["features"]:
        mask = out[feature["properties"][KIND]]
        for rings in _polygons(feature["geometry"]):
            pts = [np.round((np.asarray(r, np.float64) / downsample - 0.5) * scale).astype(np.int32) for r in rings]
            layer = np.zeros(shape, np.uint8)
            cv2.fillPoly(layer, pts, 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
            mask |= layer
    return {kind: m.astype(bool) for kind, m in out.items()}


def _boxes(boxes: pd.DataFrame | np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(boxes, pd.DataFrame):
        return (boxes["x"].to_numpy(np.float64), boxes["y"].to_numpy(np.float64), boxes["size"].to_numpy(np.float64))
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"boxes: a 2-D array, got shape {arr.shape}")
    if arr.shape[1] == 3:
        return arr[:, 0], arr[:, 1], arr[:, 2]
    if arr.shape[1] == 2 and size is not None:
        return arr[:, 0], arr[:, 1], np.full(len(arr), float(size))
    raise ValueError("boxes: a frame with x, y, size; an (N, 3) array of x, y, size; or (N, 2) coords with size=")


def patch_truth(
    boxes: pd.DataFrame | np.ndarray,
    regions: Mapping[str, Any] | str | Path,
    *,
    size: int | None = None,
    downsample: float = 8.0,
) -> pd.DataFrame:
    """The region kind of each patch: the kind covering the largest share of its level-0 box.

    Parameters
    ----------
    boxes: the patches' level-0 boxes: a tile manifest (``results/tiles/{slide}.parquet``,
        columns ``x``, ``y`` (top-left) and ``size``, level-0 px), an (N, 3) array of x, y,
        size, or a feature file's (N, 2) ``coords`` (level-0 top-left) with ``size=`` (the
        group's ``size`` attr, level-0 px).
    regions: a region GeoJSON (dict or path): polygons in level-0 px with property ``kind``.
    downsample: level-0 px per raster cell of the computation (8 at 0.5 um/px: 4 um cells).
        Box edges are rounded to cells, and a cell a polygon's edge passes through counts as
        inside it, so shares are exact to about one cell along each edge.

    Returns
    -------
    One row per patch, in order: ``kind`` (the winner, or ``"background"`` when more of the box
    is covered by no region than by any one kind; a tie goes to the first kind), ``fraction`` (the winner's share of the
    box, 0..1) and ``fraction_{kind}`` for every kind of the collection.
    """
    if not isinstance(regions, Mapping):
        regions = read_regions(regions)
    x, y, s = _boxes(boxes, size)
    kinds = region_kinds(regions)
    extent = [np.max(x + s, initial=0.0), np.max(y + s, initial=0.0)]
    for feature in regions["features"]:
        for rings in _polygons(feature["geometry"]):
            pts = np.asarray(rings[0], np.float64)
            extent = [max(extent[0], float(pts[:, 0].max())), max(extent[1], float(pts[:, 1].max()))]
    shape = (int(np.ceil(extent[1] / downsample)) + 1, int(np.ceil(extent[0] / downsample)) + 1)
    masks = region_masks(regions, shape, downsample)
    union = np.zeros(shape, bool)
    for m in masks.values():
        union |= m
    fractions = np.zeros((len(x), len(kinds) + 1), np.float32)
    for k, mask in enumerate([*(masks[kind] for kind in kinds), ~union]):
        ii = integral_image(mask)
        for side in np.unique(s):  # box_fractions takes one size: group the patches by theirs
            sel = s == side
            fractions[sel, k] = box_fractions(ii, x[sel], y[sel], int(side), downsample)
    names = np.asarray([*kinds, BACKGROUND], dtype=object)
    win = fractions.argmax(axis=1) if len(x) else np.zeros(0, np.int64)
    df = pd.DataFrame({"kind": pd.array(names[win], dtype="string"),
                       "fraction": fractions[np.arange(len(x)), win] if len(x) else np.zeros(0, np.float32)})
    for k, kind in enumerate(kinds):
        df[f"fraction_{kind}"] = fractions[:, k]
    return df
