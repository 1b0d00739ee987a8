"""Synthetic pyramidal slides for the embedded demo and for benchmarks.

Writes a generic tiled, JPEG-compressed pyramidal TIFF with TIFF resolution tags
(pixels per centimetre), which OpenSlide reads as a ``generic-tiff`` slide. The content
is procedural H&E-like tissue: pink stroma inside a few smooth blobs on white glass, with
purple nuclei whose size is fixed in microns, so the picture is physically consistent at
every magnification. Nothing is downloaded; the same arguments give the same file.

Memory: level 0 is generated tile by tile; the first reduced level (downsample 4) is held
in memory (``width * height * 3 / 16`` bytes, 315 MB for 40960 x 40960 px).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import tifffile

from mrplip_core.io.atomic import atomic_path

TILE = 256  # TIFF tile side, px
_COARSE = 256  # level-0 px per cell of the coarse tissue field


def _tissue_field(width: int, height: int, rng: np.random.Generator, n_blobs: int) -> np.ndarray:
    """Coarse float field (cells of ``_COARSE`` level-0 px): > 0.5 inside tissue."""
    gh, gw = height // _COARSE + 2, width // _COARSE + 2
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    field = np.zeros((gh, gw), np.float32)
    for _ in range(n_blobs):
        cx, cy = rng.uniform(0.3, 0.7) * gw, rng.uniform(0.3, 0.7) * gh
        rx, ry = rng.uniform(0.25, 0.4) * gw, rng.uniform(0.25, 0.4) * gh
        ang = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / rx
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ry
        field = np.maximum(field, np.exp(-(u**2 + v**2)))
    noise = cv2.GaussianBlur(rng.standard_normal((gh, gw)).astype(np.float32), (0, 0), 2.0)
    return field + 0.15 * noise


def _render_tile(
    x0: int, y0: int, w: int, h: int, field: np.ndarray, mpp: float, seed: int
) -> np.ndarray:
    """Render level-0 box ``(x0, y0, w, h)`` as RGB uint8."""
    # tissue mask: bilinear upsample of the coarse field
    fx = (np.arange(x0, x0 + w, dtype=np.float32) + 0.5) / _COARSE - 0.5
    fy = (np.arange(y0, y0 + h, dtype=np.float32) + 0.5) / _COARSE - 0.5
    mx, my = np.meshgrid(fx, fy)
    val = cv2.remap(field, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    tissue = val > 0.5
    img = np.full((h, w, 3), (242, 242, 240), np.uint8)
    if not tissue.any():
        return img
    rng = np.random.default_rng([seed, x0, y0])
    # eosin stroma with smooth intensity variation (fibres)
    shade = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), max(1.0, 4.0 / mpp))
    shade = shade / (shade.std() + 1e-6)
    stroma = np.stack(
        [232 + 8 * shade, 160 + 18 * shade, 196 + 12 * shade], axis=-1
    ).clip(0, 255).astype(np.uint8)
    img[tissue] = stroma[tissue]
    # nuclei: ~ 1 per 100 um^2 of tissue, radius 3 um, haematoxylin purple
    area_um2 = w * h * mpp * mpp
    n = rng.poisson(area_um2 / 100.0)
    r = max(1, int(round(3.0 / mpp)))
    cx = rng.integers(0, w, n)
    cy = rng.integers(0, h, n)
    inside = tissue[cy, cx]
    for a, b in zip(cx[inside], cy[inside]):
        col = (int(rng.integers(70, 110)), int(rng.integers(40, 70)), int(rng.integers(120, 160)))
        cv2.circle(img, (int(a), int(b)), r, col, -1, lineType=cv2.LINE_AA)
    return img


def write_synthetic_slide(
    path: str | Path,
    width: int,
    height: int,
    mpp: float = 0.25,
    *,
    seed: int = 0,
    n_blobs: int = 3,
    min_level_px: int = 1024,
    quality: int = 85,
) -> Path:
    """Write a synthetic pyramidal TIFF of ``width`` x ``height`` level-0 px at ``mpp`` um/px.

    Levels have downsamples 1, 4, 16, ... until the level's longer side is below
    ``min_level_px``. Resolution tags hold ``1e4 / mpp`` px/cm. Written atomically.
    """
    rng = np.random.default_rng(seed)
    field = _tissue_field(width, height, rng, n_blobs)
    level1 = np.zeros(((height + 3) // 4, (width + 3) // 4, 3), np.uint8)

    def level0_tiles() -> Iterator[np.ndarray]:
        for ty in range(0, height, TILE):
            for tx in range(0, width, TILE):
                tile = np.full((TILE, TILE, 3), 255, np.uint8)
                w, h = min(TILE, width - tx), min(TILE, height - ty)
                rendered = _render_tile(tx, ty, w, h, field, mpp, seed)
                tile[:h, :w] = rendered
                small = cv2.resize(rendered, ((w + 3) // 4, (h + 3) // 4), interpolation=cv2.INTER_AREA)
                level1[ty // 4 : ty // 4 + small.shape[0], tx // 4 : tx // 4 + small.shape[1]] = small
                yield tile

    res = (1e4 / mpp, 1e4 / mpp)
    opts = dict(
        tile=(TILE, TILE),
        compression="jpeg",
        compressionargs={"level": quality},
        photometric="rgb",
        resolution=res,
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    out = Path(path)
    with atomic_path(out) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tif:
            tif.write(level0_tiles(), shape=(height, width, 3), dtype=np.uint8, description="mrplip synthetic slide", **opts)
            level, ds = level1, 4
            while max(level.shape[:2]) >= min_level_px // 4 and max(width, height) // ds >= min_level_px:
                tif.write(
                    level, subfiletype=1, resolution=(res[0] / ds, res[1] / ds), **{k: v for k, v in opts.items() if k != "resolution"}
                )
                level = cv2.resize(level, ((level.shape[1] + 3) // 4, (level.shape[0] + 3) // 4), interpolation=cv2.INTER_AREA)
                ds *= 4
    return out
