"""Open a whole-slide image, resolve its resolution, and read regions at a magnification.

Units used throughout:
- *level-0 px*: pixel coordinates of the full-resolution pyramid level (OpenSlide's frame);
- *um/px* (mpp): microns per pixel at level 0;
- *magnification* (x): ``10 / um_per_px`` (see :mod:`mrplip_core.wsi.magnification`).

Any format OpenSlide reads works (Aperio SVS, generic tiled TIFF, Hamamatsu NDPI, MIRAX,
Leica SCN, DICOM-WSI given as its folder or one of its files, ...).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openslide

from mrplip_core.wsi.magnification import base_magnification

#: Centimetres/inches to microns, for TIFF ResolutionUnit.
_UM_PER_UNIT = {"centimeter": 1e4, "inch": 25400.0}


class SlideError(RuntimeError):
    """A slide cannot be used; the message always names the slide id and the file."""


@dataclass(frozen=True)
class SlideInfo:
    """What the pipeline records about a slide (one row of ``results/slides.parquet``)."""

    slide_id: str
    path: str
    vendor: str
    mpp: float  # um/px at level 0
    mpp_source: str  # table | openslide | tiff-resolution | fallback
    objective: float  # base magnification (x), from mpp with tolerance bands
    width: int  # level-0 px
    height: int  # level-0 px
    levels: int
    level_downsamples: tuple[float, ...] = field(default_factory=tuple)

    def to_record(self) -> dict[str, Any]:
        """A flat dict for tables and JSON (downsamples as a list)."""
        record = asdict(self)
        record["level_downsamples"] = list(self.level_downsamples)
        return record


def resolve_mpp(
    properties: dict[str, str],
    *,
    table_mpp: float | None = None,
    fallback_mpp: float | None = None,
) -> tuple[float, str] | None:
    """Microns per pixel at level 0, and where it came from; None if nothing applies.

    Order: the slide table's ``mpp`` column, OpenSlide's ``openslide.mpp-x``, the TIFF
    resolution tags (``tiff.XResolution`` with ``tiff.ResolutionUnit`` centimeter/inch),
    then the configured fallback.
    """
    if table_mpp is not None and not (isinstance(table_mpp, float) and math.isnan(table_mpp)):
        return float(table_mpp), "table"
    mpp_x = properties.get(openslide.PROPERTY_NAME_MPP_X)
    if mpp_x:
        try:
            value = float(mpp_x)
        except ValueError:
            value = 0.0
        if value > 0:
            return value, "openslide"
    unit = properties.get("tiff.ResolutionUnit", "").lower()
    res = properties.get("tiff.XResolution")
    if unit in _UM_PER_UNIT and res:
        try:
            px_per_unit = float(res)
        except ValueError:
            px_per_unit = 0.0
        if px_per_unit > 0:
            return _UM_PER_UNIT[unit] / px_per_unit, "tiff-resolution"
    if fallback_mpp is not None:
        return float(fallback_mpp), "fallback"
    return None


def _open_target(path: Path) -> Path:
    """OpenSlide opens DICOM-WSI from one of its files; accept the folder too."""
    if path.is_dir():
        dcm = sorted(path.glob("*.dcm"))
        if not dcm:
            raise FileNotFoundError(f"{path} is a folder without .dcm files")
        return dcm[0]
    return path


class Slide:
    """An open whole-slide image with a known resolution.

    Parameters
    ----------
    path: the slide file (or DICOM-WSI folder).
    slide_id: the id used in every artifact and error message.
    mpp: per-slide override in um/px (the slide table's ``mpp`` column), or None.
    fallback_mpp: used when neither the table nor the file gives a resolution, or None.

    Raises
    ------
    SlideError: the file is missing, empty (0 bytes), not readable by this user, OpenSlide
        cannot open it (not a slide format, truncated, a folder without DICOM files), or no
        mpp can be resolved; the message names ``slide_id`` and ``path``.
    """

    def __init__(
        self,
        path: str | Path,
        slide_id: str | None = None,
        *,
        mpp: float | None = None,
        fallback_mpp: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.slide_id = slide_id or self.path.stem
        if not self.path.exists():
            raise SlideError(f"slide {self.slide_id!r}: file not found: {self.path}")
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise SlideError(f"slide {self.slide_id!r}: file is empty (0 bytes): {self.path}")
        if not os.access(self.path, os.R_OK):
            raise SlideError(f"slide {self.slide_id!r}: no read permission for {self.path}")
        try:
            self._osr = openslide.OpenSlide(str(_open_target(self.path)))
        except (openslide.OpenSlideError, FileNotFoundError, ValueError) as exc:
            raise SlideError(f"slide {self.slide_id!r}: OpenSlide cannot open {self.path}: {exc}") from exc
        props = dict(self._osr.properties)
        resolved = resolve_mpp(props, table_mpp=mpp, fallback_mpp=fallback_mpp)
        if resolved is None:
            self._osr.close()
            raise SlideError(
                f"slide {self.slide_id!r}: no microns-per-pixel in {self.path} "
                "(no openslide.mpp-x, no TIFF resolution tags); set its 'mpp' column in the "
                "slide table or 'mpp_fallback' in the config"
            )
        mpp_value, source = resolved
        width, height = self._osr.dimensions
        self.info = SlideInfo(
            slide_id=self.slide_id,
            path=str(self.path),
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
            mpp=mpp_value,
            mpp_source=source,
            objective=base_magnification(mpp_value),
            width=int(width),
            height=int(height),
            levels=int(self._osr.level_count),
            level_downsamples=tuple(float(d) for d in self._osr.level_downsamples),
        )

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the OpenSlide handle."""
        self._osr.close()

    @property
    def mpp(self) -> float:
        """Level-0 resolution in um/px."""
        return self.info.mpp

    # -- reading ---------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """Pyramid level to read for a wanted ``downsample`` (level-0 px per output px).

        The coarsest level whose own downsample does not exceed the wanted one, so the
        read is at or above the needed resolution and is then resized down (never up,
        except by the sub-percent rounding a level's stored downsample may carry).
        """
        downsamples = self.info.level_downsamples
        candidates = [i for i, d in enumerate(downsamples) if d <= downsample * (1 + 1e-3)]
        return max(candidates, key=lambda i: downsamples[i]) if candidates else 0

    def read_region(self, x: int, y: int, size: int, out_px: int, *, level: int | None = None) -> np.ndarray:
        """Read the square box at level-0 ``(x, y)`` of side ``size`` level-0 px as RGB.

        The box is read from ``level`` (default: :meth:`best_level` for ``size / out_px``)
        and resized to ``out_px`` x ``out_px`` (area interpolation when shrinking, cubic
        when enlarging). Areas outside the slide or transparent come out white.
        Returns a ``(out_px, out_px, 3)`` uint8 array.
        """
        return self.read_rect(x, y, size, size, out_px, out_px, level=level)

    def read_rect(
        self, x: int, y: int, w: int, h: int, out_w: int, out_h: int, *, level: int | None = None
    ) -> np.ndarray:
        """Read a level-0 rectangle ``(x, y, w, h)`` resized to ``(out_h, out_w, 3)`` RGB uint8."""
        if level is None:
            level = self.best_level(min(w / out_w, h / out_h))
        ds = self.info.level_downsamples[level]
        lw, lh = max(1, math.ceil(w / ds)), max(1, math.ceil(h / ds))
        try:
            rgba = np.asarray(self._osr.read_region((int(x), int(y)), level, (lw, lh)))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"slide {self.slide_id!r}: read failed at level-0 ({x}, {y}) size {w}x{h} "
                f"level {level} in {self.path}: {exc}"
            ) from exc
        return resize_level_pixels(_rgba_to_rgb_on_white(rgba), out_w, out_h)

    def thumbnail(self, target_mpp: float, chunk_px: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB overview at about ``target_mpp`` um/px, built in chunks.

        Reads the best pyramid level for the wanted downsample in strips of at most
        ``chunk_px`` x ``chunk_px`` level px, resizing each, so memory stays bounded by
        the thumbnail plus one chunk even on a single-level slide of any size.
        Returns ``(image, downsample)`` where ``downsample`` is level-0 px per thumbnail
        px (exact: the thumbnail's size is ``ceil(level-0 size / downsample)``).
        """
        wanted = max(1.0, target_mpp / self.mpp)
        out_w = max(1, math.ceil(self.info.width / wanted))
        out_h = max(1, math.ceil(self.info.height / wanted))
        level = self.best_level(wanted)
        ds_level = self.info.level_downsamples[level]
        # chunk side in level-0 px, a multiple of the thumbnail downsample so chunks tile exactly
        step_out = max(1, int(chunk_px * ds_level / wanted))
        step0 = step_out * wanted
        thumb = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
        for ty in range(0, out_h, step_out):
            for tx in range(0, out_w, step_out):
                cw, ch = min(step_out, out_w - tx), min(step_out, out_h - ty)
                x0, y0 = int(round(tx * wanted)), int(round(ty * wanted))
                w0 = int(round(min(step0, cw * wanted)))
                h0 = int(round(min(step0, ch * wanted)))
                thumb[ty : ty + ch, tx : tx + cw] = self.read_rect(x0, y0, w0, h0, cw, ch, level=level)
        return thumb, wanted


def resize_level_pixels(rgb: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Level pixels to ``out_w`` x ``out_h`` px the way every patch read is resized: area
    interpolation when shrinking, bicubic otherwise, untouched when the size already fits."""
    h, w = rgb.shape[:2]
    if (w, h) == (out_w, out_h):
        return rgb
    interp = cv2.INTER_AREA if (w >= out_w and h >= out_h) else cv2.INTER_CUBIC
    return cv2.resize(rgb, (out_w, out_h), interpolation=interp)


def _rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's (non-premultiplied) RGBA onto white; returns RGB uint8."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)  # same pixels as rgba[..., :3], ~30x faster copy
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255  # integer maths: no float copy
    return out.astype(np.uint8)
