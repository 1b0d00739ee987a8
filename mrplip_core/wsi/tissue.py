"""Tissue detection on an RGB overview (thumbnail) of a whole-slide image.

Every size is physical: filters, kernels and area limits are given in um or um^2 and
converted to pixels with the image's resolution ``mpp`` (um/px), so the same parameters
mean the same thing on a 20x and a 40x scan and at any thumbnail resolution.

Pipeline of :func:`detect_tissue` (OpenCV on uint8 images; about 0.3 s and 150 MiB for a
3000 x 3000 px thumbnail):

1. per input pixel, after a 3 x 3 median against JPEG noise: HSV saturation above a
   threshold (Otsu's, over the non-pen pixels, clipped to ``[min_saturation,
   max_saturation]``, or a fixed value), not pen ink (green, blue, red or dark marker
   colours), not near-white (every channel >= ``white_level``: glass, the grey
   background tiles some scanners write);
2. an image finer than ``work_mpp`` is pooled to that resolution (a working pixel is
   tissue when at least ``min_pixel_share`` of the input pixels under it are), so cost
   and result hardly depend on the input resolution; the mask is resized back at the end;
3. morphological close (``close_um``), then a median (majority) filter
   (``median_blur_um``). Closing first joins thin lattices such as fat membranes
   before the median would erase them; the median then removes thin lines (cover-slip
   edges, hairs), dust and ragged borders;
4. pen ink blobs wider than ``median_blur_um`` (scattered ink-coloured pixels are
   blood or dark nuclei) are removed together with a ``pen_margin_um`` halo;
5. holes smaller than ``min_hole_area_um2`` (or all, with ``fill_holes``) are filled and
   connected components smaller than ``min_area_um2`` are dropped.

Coordinates: a thumbnail pixel ``(x, y)`` covers level-0 px
``[x * downsample, (x + 1) * downsample)``, where ``downsample`` is level-0 px per
thumbnail px (what :meth:`mrplip_core.wsi.slide.Slide.thumbnail` returns).
"""

from __future__ import annotations

import math
import textwrap
import uuid
from dataclasses import dataclass, fields
from typing import Any, Mapping

import cv2
import numpy as np

__all__ = [
    "TissueParams",
    "detect_tissue",
    "tissue_fraction",
    "saturation_threshold",
    "pen_mask",
    "mask_to_geojson",
    "draw_qc",
    "error_card",
]

#: QuPath colour of the "Tissue" class, and the tissue outline colour of :func:`draw_qc` (RGB).
TISSUE_COLOR: tuple[int, int, int] = (0, 170, 60)
#: Colour of the boxes drawn by :func:`draw_qc` (RGB).
BOX_COLOR: tuple[int, int, int] = (30, 60, 230)
#: Namespace of the deterministic feature ids in the GeoJSON (uuid5 of slide id + index).
_GEOJSON_NAMESPACE = uuid.UUID("6f1c1c2e-3a51-4d1f-9a57-6b0f3c6e2d10")

#: Pen ink in OpenCV HSV (hue 0-179 = 0-358 deg, saturation and value 0-255), as
#: inclusive (low, high) bounds. H&E is violet to pink (hue about 120-172), never green.
_PEN_HSV_RANGES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((35, 40, 0), (95, 255, 255)),  # green / teal ink (70-190 deg)
    ((96, 80, 0), (118, 255, 255)),  # blue ink (192-236 deg); haematoxylin is >= 240 deg
    ((173, 40, 0), (179, 255, 255)),  # red ink, and its halo (346-358 deg); eosin is bluer
    ((0, 40, 0), (5, 255, 255)),  # red ink (0-10 deg)
    ((165, 100, 0), (179, 255, 109)),  # dark red / maroon ink
)


@dataclass(frozen=True)
class TissueParams:
    """Settings of :func:`detect_tissue`. Sizes are physical (um, um^2), never pixels.

    Colour values are 0-255 on the channels of an 8-bit image (OpenCV's HSV: hue 0-179,
    saturation 0-255, value 0-255). Defaults suit H&E (and IHC) thumbnails at 2-16 um/px.
    """

    #: Saturation threshold (0-255) above which a pixel is tissue-coloured, or "otsu" to
    #: compute it per image (Otsu over the non-pen pixels, clipped to
    #: ``[min_saturation, max_saturation]``).
    threshold: float | str = "otsu"
    #: Lowest threshold Otsu may return (0-255): glass is 0-10 (99th percentile about 20
    #: with JPEG noise), so a blank slide never becomes tissue.
    min_saturation: float = 15.0
    #: Highest threshold Otsu may return (0-255): on a slide that is mostly tissue Otsu
    #: splits the tissue itself (pale stroma and fat membranes are 20-40).
    max_saturation: float = 25.0
    #: Side of the median (majority) filter on the mask, in um (odd px; < 2 px: none).
    median_blur_um: float = 32.0
    #: Diameter of the elliptic kernel of the morphological close in um: joins tissue
    #: separated by less than this (odd px; < 2 px: none).
    close_um: float = 64.0
    #: Connected tissue components smaller than this (um^2) are dropped as debris.
    #: 20,000 um^2 is a 141 um square, about 18 x 18 px at 8 um/px.
    min_area_um2: float = 20_000.0
    #: Holes (background enclosed by tissue) smaller than this (um^2) are filled; larger
    #: ones (lumens, tears) stay holes. 250,000 um^2 is a 0.5 mm square.
    min_hole_area_um2: float = 250_000.0
    #: Fill every hole whatever its size (ignores ``min_hole_area_um2``).
    fill_holes: bool = False
    #: Pixels whose R, G and B are all >= this (0-255) are background (glass, scanner
    #: background tiles), whatever their saturation.
    white_level: int = 220
    #: Remove pen/marker ink (green, blue, red, dark) from the tissue.
    pen_filter: bool = True
    #: Ink is widened by this many um to take its halo (ink on the cover slip is blurred).
    pen_margin_um: float = 48.0
    #: Pixels darker than this (max of R, G, B; 0-255) count as dark marker ink (black,
    #: dark blue/violet/red); dark nuclei are scattered and are not removed (see step 4).
    dark_max_value: int = 90
    #: Images finer than this (um/px) are pooled to it before detection and the mask is
    #: resized back; None: always work at the input resolution.
    work_mpp: float | None = 4.0
    #: When pooling to ``work_mpp``: a working pixel is tissue when at least this share
    #: (0-1] of the input pixels under it are tissue-coloured (thin membranes count).
    min_pixel_share: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.threshold, str):
            if self.threshold != "otsu":
                raise ValueError(
                    f"TissueParams.threshold: 'otsu' or a number 0-255, got {self.threshold!r}"
                )
        elif not 0 <= float(self.threshold) <= 255:
            raise ValueError(f"TissueParams.threshold: must be in 0-255, got {self.threshold!r}")
        for name in ("min_saturation", "max_saturation", "white_level", "dark_max_value"):
            value = getattr(self, name)
            if not 0 <= value <= 255:
                raise ValueError(f"TissueParams.{name}: must be in 0-255, got {value!r}")
        if self.min_saturation > self.max_saturation:
            raise ValueError(
                f"TissueParams.min_saturation ({self.min_saturation}) exceeds "
                f"max_saturation ({self.max_saturation})"
            )
        for name in ("median_blur_um", "close_um", "min_area_um2", "min_hole_area_um2", "pen_margin_um"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"TissueParams.{name}: must be >= 0, got {value!r}")
        if self.work_mpp is not None and not self.work_mpp > 0:
            raise ValueError(f"TissueParams.work_mpp: must be > 0 or None, got {self.work_mpp!r}")
        if not 0 < self.min_pixel_share <= 1:
            raise ValueError(
                f"TissueParams.min_pixel_share: must be in (0, 1], got {self.min_pixel_share!r}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TissueParams:
        """Build from a config mapping; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown tissue parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))


# -- helpers ----------------------------------------------------------------------------
def _odd_px(um: float, mpp: float) -> int:
    """A length in um as an odd pixel count at ``mpp`` um/px; 1 (no-op) below 2 px."""
    n = int(round(um / mpp))
    return 1 if n < 2 else n | 1


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    """Validate an (H, W, 3) uint8 image; RGBA is composited onto white."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB(A) uint8 image (H, W, 3|4), got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty image {arr.shape}")
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        blended = arr[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha) + 0.5
        arr = np.clip(blended, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _check_mpp(mpp: float) -> float:
    value = float(mpp)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"mpp (um/px) must be a positive number, got {mpp!r}")
    return value


def _ellipse(k: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


def _pen_u8(hsv: np.ndarray, params: TissueParams) -> np.ndarray:
    """Ink-coloured pixels of an HSV image as uint8 0/255."""
    if params.dark_max_value > 0:
        pen = cv2.inRange(hsv, (0, 0, 0), (179, 255, params.dark_max_value - 1))
    else:
        pen = np.zeros(hsv.shape[:2], np.uint8)
    for low, high in _PEN_HSV_RANGES:
        cv2.bitwise_or(pen, cv2.inRange(hsv, low, high), dst=pen)
    return pen


def pen_mask(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean (H, W) mask of ink-coloured pixels of an RGB uint8 image (per pixel).

    Classes (OpenCV HSV, hue 0-179): green/teal (hue 35-95, saturation >= 40), blue (hue
    96-118, saturation >= 80), red (hue >= 173 or <= 5, saturation >= 40), maroon (hue >=
    165, saturation >= 100, value < 110) and dark (value < ``params.dark_max_value``).
    :func:`detect_tissue` removes only blobs of these wider than ``median_blur_um``.
    """
    hsv = cv2.cvtColor(_as_rgb(rgb), cv2.COLOR_RGB2HSV)
    return _pen_u8(hsv, params).astype(bool)


def _otsu(values: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Otsu's threshold t of uint8 ``values`` (under ``mask``): maximises the
    between-class variance of ``<= t`` and ``> t``; 0 when there is nothing to split."""
    hist = cv2.calcHist([values], [0], mask, [256], [0, 256]).ravel().astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * np.arange(256))
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between))


def _pixel_features(rgb: np.ndarray, params: TissueParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per input pixel, after a 3 x 3 median: saturation, ink (0/255), near-white (0/255)."""
    denoised = cv2.medianBlur(rgb, 3) if min(rgb.shape[:2]) >= 3 else rgb
    hsv = cv2.cvtColor(denoised, cv2.COLOR_RGB2HSV)
    pen = _pen_u8(hsv, params) if params.pen_filter else np.zeros(rgb.shape[:2], np.uint8)
    level = params.white_level
    white = cv2.inRange(denoised, (level, level, level), (255, 255, 255))
    return np.ascontiguousarray(hsv[..., 1]), pen, white


def _threshold(sat: np.ndarray, pen: np.ndarray, params: TissueParams) -> float:
    if params.threshold != "otsu":
        return float(params.threshold)
    not_pen = cv2.bitwise_not(pen) if cv2.countNonZero(pen) else None
    return float(np.clip(_otsu(sat, not_pen), params.min_saturation, params.max_saturation))


def saturation_threshold(rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()) -> float:
    """The saturation threshold (0-255) :func:`detect_tissue` uses on this image (for QC logs)."""
    _check_mpp(mpp)
    sat, pen, _ = _pixel_features(_as_rgb(rgb), params)
    return _threshold(sat, pen, params)


def _working_size(shape: tuple[int, ...], mpp: float, params: TissueParams) -> tuple[int, int, float]:
    """(width, height, mpp) of the working grid: the input's, or pooled to ``work_mpp``."""
    h, w = shape[:2]
    if params.work_mpp is None or mpp >= params.work_mpp * 0.999:
        return w, h, mpp
    scale = mpp / params.work_mpp
    ow, oh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    return ow, oh, mpp * math.sqrt((w / ow) * (h / oh))


def _close(mask: np.ndarray, k: int) -> np.ndarray:
    """Morphological close with a k-px ellipse, padded with background so that glass
    between tissue and the image border is not filled (OpenCV's default border would)."""
    pad = k // 2 + 1
    padded = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _ellipse(k))
    return np.ascontiguousarray(closed[pad:-pad, pad:-pad])


def _border_labels(labels: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))


def _fill_holes(mask: np.ndarray, px_area: float, params: TissueParams) -> np.ndarray:
    """Fill background components (4-connected) that do not touch the image border."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(cv2.bitwise_not(mask), connectivity=4)
    if n <= 1:
        return mask
    fill = np.ones(n, dtype=bool)
    if not params.fill_holes:
        fill = stats[:, cv2.CC_STAT_AREA] * px_area < params.min_hole_area_um2
    fill[0] = False  # label 0: tissue
    fill[_border_labels(labels)] = False
    if not fill.any():
        return mask
    return cv2.bitwise_or(mask, fill.astype(np.uint8)[labels] * np.uint8(255))


def _drop_small(mask: np.ndarray, px_area: float, params: TissueParams, crop: bool) -> np.ndarray:
    """Drop tissue components (8-connected) smaller than ``min_area_um2``."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask
    keep = stats[:, cv2.CC_STAT_AREA] * px_area >= params.min_area_um2
    if crop:  # their extent beyond the crop is unknown: never judge them by area
        keep[_border_labels(labels)] = True
    keep[0] = False
    if keep[1:].all():
        return mask
    return keep.astype(np.uint8)[labels] * np.uint8(255)


def _detect(rgb: np.ndarray, mpp: float, params: TissueParams, crop: bool) -> np.ndarray:
    """Tissue mask (uint8 0/255) on the working grid (see :func:`_working_size`)."""
    sat, pen, white = _pixel_features(rgb, params)
    thr = _threshold(sat, pen, params)
    _, colour = cv2.threshold(sat, thr, 255, cv2.THRESH_BINARY)  # sat > thr
    cv2.bitwise_and(colour, cv2.bitwise_not(cv2.bitwise_or(pen, white)), dst=colour)
    has_pen = cv2.countNonZero(pen) > 0
    w, h, mpp = _working_size(rgb.shape, mpp, params)
    if (w, h) != (rgb.shape[1], rgb.shape[0]):
        share = cv2.resize(colour, (w, h), interpolation=cv2.INTER_AREA)  # 255 * share
        _, mask = cv2.threshold(share, params.min_pixel_share * 255 - 0.5, 255, cv2.THRESH_BINARY)
        if has_pen:
            pen = cv2.resize(pen, (w, h), interpolation=cv2.INTER_AREA)
            _, pen = cv2.threshold(pen, 127, 255, cv2.THRESH_BINARY)
    else:
        mask = colour
    k_close = _odd_px(params.close_um, mpp)
    if k_close > 1:  # before the median, so thin lattices (fat) are joined, not erased
        mask = _close(mask, k_close)
    k_med = _odd_px(params.median_blur_um, mpp)
    if k_med > 1:
        mask = cv2.medianBlur(mask, k_med)
    if has_pen:
        if k_med > 1:  # ink strokes are wide: scattered ink-coloured px are blood or nuclei
            pen = cv2.morphologyEx(pen, cv2.MORPH_OPEN, _ellipse(k_med))
        k_margin = _odd_px(2 * params.pen_margin_um, mpp)
        if k_margin > 1:
            pen = cv2.dilate(pen, _ellipse(k_margin))
        cv2.bitwise_and(mask, cv2.bitwise_not(pen), dst=mask)
    px_area = mpp * mpp  # um^2 per working px
    mask = _fill_holes(mask, px_area, params)
    return _drop_small(mask, px_area, params, crop)


# -- public API -------------------------------------------------------------------------
def detect_tissue(
    rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams(), *, crop: bool = False
) -> np.ndarray:
    """Boolean mask (H, W) of tissue on an RGB uint8 image whose pixels are ``mpp`` um/px.

    Parameters
    ----------
    rgb: (H, W, 3) uint8 RGB image (RGBA is composited onto white), e.g. a slide
        thumbnail at about 8 um/px.
    mpp: resolution of ``rgb`` in um/px (level-0 mpp x thumbnail downsample).
    params: see :class:`TissueParams`; all sizes in um / um^2.
    crop: ``rgb`` is a crop of a slide (a tile), not the whole slide: components that
        touch the image border are kept whatever their area, because their extent beyond
        the crop is unknown.

    Returns
    -------
    (H, W) bool array, True on tissue.
    """
    image = _as_rgb(rgb)
    mask = _detect(image, _check_mpp(mpp), params, crop)
    h, w = image.shape[:2]
    if mask.shape != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return mask.astype(bool)


def tissue_fraction(
    rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams(), *, crop: bool = True
) -> float:
    """Fraction (0-1) of the image's area that is tissue, for an RGB uint8 image at ``mpp`` um/px.

    By default the image is treated as a crop of a slide (a tile or patch), see
    :func:`detect_tissue`; pass ``crop=False`` for a whole-slide thumbnail.
    """
    image = _as_rgb(rgb)
    mask = _detect(image, _check_mpp(mpp), params, crop)
    return cv2.countNonZero(mask) / float(mask.size)


def _ring(points: np.ndarray, downsample: float, hole: bool) -> list[list[float]]:
    """A closed GeoJSON ring in level-0 px from contour points (thumbnail px centres).

    Winding as RFC 7946 states it, numerically (positive shoelace area for an outline,
    negative for a hole); QuPath accepts either.
    """
    pts = points.reshape(-1, 2).astype(np.float64)
    if len(pts) < 3:  # a one-pixel-wide component: use the outline of its pixels
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0) + 1.0
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    else:
        pts = pts + 0.5  # pixel centre
    pts = pts * downsample
    x, y = pts[:, 0], pts[:, 1]
    signed = float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
    if (signed > 0) == hole:
        pts = pts[::-1]
    ring = [[round(float(px), 2), round(float(py), 2)] for px, py in pts]
    ring.append(ring[0])
    return ring


def mask_to_geojson(mask: np.ndarray, downsample: float, slide_id: str) -> dict[str, Any]:
    """GeoJSON FeatureCollection of the tissue polygons of ``mask``, in level-0 px.

    Parameters
    ----------
    mask: (H, W) bool tissue mask on a thumbnail.
    downsample: level-0 px per mask px (thumbnail downsample).
    slide_id: recorded in the collection's properties and in the feature ids.

    Returns
    -------
    A JSON-serialisable dict. One Feature per connected tissue component, a Polygon whose
    first ring is the outline and whose further rings are its holes. Vertices are the
    centres of the boundary pixels scaled to level 0: mask px ``(x, y)`` becomes level-0
    ``((x + 0.5) * downsample, (y + 0.5) * downsample)``. Properties make QuPath import
    them as annotations of class "Tissue" (``objectType: annotation``,
    ``classification: {name: Tissue, color}``). Feature ids are stable (uuid5 of the
    slide id and the component's index in raster order).
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if not downsample > 0:
        raise ValueError(f"downsample must be positive, got {downsample!r}")
    contours, hierarchy = cv2.findContours(
        np.ascontiguousarray(m.astype(np.uint8)), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    features: list[dict[str, Any]] = []
    if hierarchy is not None:
        hier = hierarchy[0]
        for i, contour in enumerate(contours):
            if hier[i][3] != -1:  # a hole: emitted with its parent
                continue
            rings = [_ring(contour, downsample, hole=False)]
            child = hier[i][2]
            while child != -1:
                rings.append(_ring(contours[child], downsample, hole=True))
                child = hier[child][0]
            index = len(features)
            features.append(
                {
                    "type": "Feature",
                    "id": str(uuid.uuid5(_GEOJSON_NAMESPACE, f"{slide_id}/{index}")),
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {
                        "objectType": "annotation",
                        "name": f"Tissue {index + 1}",
                        "classification": {"name": "Tissue", "color": list(TISSUE_COLOR)},
                        "isLocked": False,
                    },
                }
            )
    return {
        "type": "FeatureCollection",
        "properties": {
            "slide_id": slide_id,
            "coordinates": "level-0 px",
            "downsample": float(downsample),
        },
        "features": features,
    }


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    return text.encode("ascii", "replace").decode("ascii")


def draw_qc(
    rgb: np.ndarray,
    mask: np.ndarray,
    boxes: list[tuple[float, float, float, float]],
    labels: list[str] | None = None,
) -> np.ndarray:
    """QC overview: the thumbnail with the tissue outline and labelled boxes drawn on it.

    Parameters
    ----------
    rgb: (H, W, 3) uint8 thumbnail.
    mask: (H, W) bool tissue mask of the same thumbnail.
    boxes: ``(x, y, w, h)`` in thumbnail px (e.g. the chosen parent patches).
    labels: one text per box (e.g. the parent index), or None.

    Returns
    -------
    A new (H, W, 3) uint8 RGB image: tissue outline in green, boxes in blue with their
    labels; line width and text size grow with the image.
    """
    image = _as_rgb(rgb).copy()
    m = np.asarray(mask)
    if m.shape != image.shape[:2]:
        raise ValueError(f"mask shape {m.shape} does not match image {image.shape[:2]}")
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"{len(labels)} labels for {len(boxes)} boxes")
    h, w = image.shape[:2]
    thick = max(1, int(round(min(h, w) / 300)))
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, TISSUE_COLOR, thick)
    scale = max(0.35, min(h, w) / 1200)
    for i, (bx, by, bw, bh) in enumerate(boxes):
        p0 = (int(round(bx)), int(round(by)))
        p1 = (int(round(bx + bw)) - 1, int(round(by + bh)) - 1)
        cv2.rectangle(image, p0, p1, BOX_COLOR, thick)
        if labels is not None:
            org = (p0[0] + thick + 1, p0[1] + int(14 * scale * 1.5) + thick)
            text = _ascii(str(labels[i]))
            font = cv2.FONT_HERSHEY_SIMPLEX
            cv2.putText(image, text, org, font, scale, (255, 255, 255), thick + 2, cv2.LINE_AA)  # halo
            cv2.putText(image, text, org, font, scale, BOX_COLOR, thick, cv2.LINE_AA)
    return image


def _fit(text: str, font: int, scale: float, thickness: int, width: int) -> str:
    """``text`` cut (with "...") to at most ``width`` px when drawn."""
    if cv2.getTextSize(text, font, scale, thickness)[0][0] <= width:
        return text
    while text and cv2.getTextSize(text + "...", font, scale, thickness)[0][0] > width:
        text = text[:-1]
    return text + "..."


def error_card(slide_id: str, message: str, size: tuple[int, int] = (256, 640)) -> np.ndarray:
    """A small RGB image stating that a slide failed and why.

    Used as the QC PNG of a slide that could not be processed, so every slide has one.
    ``size`` is (height, width) in px; the message is word-wrapped and cut to fit
    (non-ASCII characters are drawn as "?"). Returns a (height, width, 3) uint8 RGB image.
    """
    height, width = int(size[0]), int(size[1])
    if height < 64 or width < 128:
        raise ValueError(f"error card too small: {size} (height, width); at least (64, 128)")
    red = (200, 30, 30)
    card = np.full((height, width, 3), 245, dtype=np.uint8)
    cv2.rectangle(card, (0, 0), (width - 1, height - 1), red, 3)
    font, margin = cv2.FONT_HERSHEY_SIMPLEX, 12
    avail = width - 2 * margin
    title = _fit(_ascii(f"FAILED: {slide_id}"), font, 0.7, 2, avail)
    cv2.putText(card, title, (margin, 30), font, 0.7, red, 2, cv2.LINE_AA)
    scale, line_h, top = 0.45, 18, 52
    max_lines = max(1, (height - top) // line_h)
    per_line = max(8, avail // cv2.getTextSize("n", font, scale, 1)[0][0])
    while True:
        lines: list[str] = []
        for paragraph in _ascii(message).splitlines() or [""]:
            lines.extend(textwrap.wrap(paragraph, per_line, break_long_words=True) or [""])
        if per_line <= 8 or all(cv2.getTextSize(x, font, scale, 1)[0][0] <= avail for x in lines):
            break
        per_line -= 2
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + " ...", font, scale, 1, avail)
    for i, line in enumerate(lines):
        cv2.putText(card, line, (margin, top + i * line_h), font, scale, (30, 30, 30), 1, cv2.LINE_AA)
    return card
