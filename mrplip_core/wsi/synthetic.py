"""Synthetic pyramidal slides for the embedded demo and for benchmarks.

Writes a generic tiled, JPEG-compressed pyramidal TIFF with TIFF resolution tags
(pixels per centimetre), which OpenSlide reads as a ``generic-tiff`` slide. The content
is procedural H&E-like tissue: pink stroma inside a few smooth blobs on white glass, with
purple nuclei whose size is fixed in microns, so the picture is physically consistent at
every magnification. Nothing is downloaded; the same arguments give the same file.

The pieces are reusable: :class:`Appearance` says how one tissue kind is painted (colour,
texture, nuclei, vacuoles, and optionally gland architecture; lengths in um),
:func:`paint_tissue` paints it into a tile,
:func:`tissue_field` / :func:`sample_field` give smooth shapes on a coarse grid, and
:func:`write_pyramid` writes any tile renderer as a pyramidal TIFF. ``wsi/planted.py``
builds slides of several tissue kinds with known regions from them.

Memory: level 0 is generated tile by tile; the first reduced level (downsample 4) is held
in memory (``width * height * 3 / 16`` bytes, 315 MB for 40960 x 40960 px).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import tifffile

from mrplip_core.io.atomic import atomic_path

TILE = 256  # TIFF tile side, px
COARSE = 256  # level-0 px per cell of the coarse fields (tissue shape, regions)
GLASS_RGB = (242, 242, 240)  # empty glass

#: ``render(x0, y0, w, h)`` -> the level-0 box as (h, w, 3) RGB uint8.
TileRenderer = Callable[[int, int, int, int], np.ndarray]


@dataclass(frozen=True)
class Appearance:
    """How one tissue kind is painted. Lengths in um (physically fixed: the same tissue at
    every scan resolution), densities per 100 um^2 of the kind's area, colours RGB 0-255.

    The defaults are the demo slide's stroma (:data:`DEMO_STROMA`).
    """

    base_rgb: tuple[float, float, float] = (232.0, 160.0, 196.0)  # mean colour of the matrix
    shade_rgb: tuple[float, float, float] = (8.0, 18.0, 12.0)  # per-channel amplitude of the texture
    texture_um: float = 4.0  # Gaussian sigma of the smooth texture, um (at least 1 px)
    fibre_stretch: float = 1.0  # > 1: texture stretched this many times along x (fibres)
    nuclei_per_100um2: float = 1.0
    nucleus_radius_um: tuple[float, float] = (3.0, 3.0)  # range of the semi-major axis
    nucleus_aspect: tuple[float, float] = (1.0, 1.0)  # range of major / minor axis
    nucleus_angle_deg: tuple[float, float] = (0.0, 180.0)  # range of the major axis' angle
    nucleus_rgb_low: tuple[int, int, int] = (70, 40, 120)  # per channel, inclusive
    nucleus_rgb_high: tuple[int, int, int] = (110, 70, 160)  # per channel, exclusive
    vacuoles_per_100um2: float = 0.0  # round clear spaces (fat, mucin), drawn before nuclei
    vacuole_radius_um: tuple[float, float] = (5.0, 10.0)
    vacuole_rgb: tuple[int, int, int] = (246, 244, 246)
    glands: Glands | None = None  # None: the kind is a uniform sheet of this appearance

    @property
    def round_nuclei(self) -> bool:
        """Whether every nucleus is the same circle (the demo's nuclei)."""
        return self.nucleus_radius_um[0] == self.nucleus_radius_um[1] and self.nucleus_aspect == (1.0, 1.0)


#: The demo slide's tissue: pink stroma with evenly scattered round nuclei 6 um across.
DEMO_STROMA = Appearance()


@dataclass(frozen=True)
class Glands:
    """Gland architecture: tissue organised as glands in stroma. Lengths in um.

    Glands sit on a square lattice of pitch ``spacing_um`` over the whole slide (each moved
    by up to ``jitter`` x the pitch), each an elliptical lumen (semi-minor axis drawn from
    ``lumen_radius_um``, major / minor from ``aspect``) lined by a rim of ``rim_um`` of the
    kind's own appearance (the epithelium); between glands lies ``stroma``. A gland is drawn
    from ``(seed, lattice cell)`` alone, so tiles rendered in any order join seamlessly.
    The default gland is 110-215 um across (a lumen of 60-165 um inside a 25 um rim); lumina of
    neighbouring glands may touch. At 5x (2 um/px) that is 55-108 px, about 25 glands per 512-px
    patch; at 40x (0.25 um/px) one 512-px patch (128 um) shows parts of up to four glands, or
    stroma only.
    """

    stroma: Appearance
    spacing_um: float = 200.0
    lumen_radius_um: tuple[float, float] = (30.0, 55.0)
    aspect: tuple[float, float] = (1.0, 1.5)
    rim_um: float = 25.0
    jitter: float = 0.15
    lumen_rgb: tuple[float, float, float] = (244.0, 236.0, 242.0)  # mean colour of the lumen's contents

    def masks(self, x0: int, y0: int, w: int, h: int, mpp: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(lumen, gland) boolean (h, w) masks of the level-0 box at ``(x0, y0)`` (level-0 px
        at ``mpp`` um/px); ``gland`` is lumen plus rim."""
        pitch = self.spacing_um / mpp
        rim = self.rim_um / mpp
        reach = self.jitter * pitch + self.lumen_radius_um[1] * self.aspect[1] / mpp + rim
        lumen = np.zeros((h, w), bool)
        gland = np.zeros((h, w), bool)
        for j in range(int(np.floor((y0 - reach) / pitch)), int(np.floor((y0 + h + reach) / pitch)) + 1):
            for i in range(int(np.floor((x0 - reach) / pitch)), int(np.floor((x0 + w + reach) / pitch)) + 1):
                rng = np.random.default_rng([seed, 0x61A4D, i + 2**20, j + 2**20])
                cx, cy = (np.array([i, j]) + 0.5 + self.jitter * rng.uniform(-1, 1, 2)) * pitch
                minor = rng.uniform(*self.lumen_radius_um) / mpp
                major = minor * rng.uniform(*self.aspect)
                angle = rng.uniform(0, np.pi)
                # pixel centres of the box within the gland's reach, exactly (no polygon
                # approximation, so a gland rasterises alike in every tile it touches)
                r = major + rim
                xa, xb = max(x0, int(np.floor(cx - r))), min(x0 + w, int(np.ceil(cx + r)) + 1)
                ya, yb = max(y0, int(np.floor(cy - r))), min(y0 + h, int(np.ceil(cy + r)) + 1)
                if xa >= xb or ya >= yb:
                    continue
                dx = np.arange(xa, xb, dtype=np.float64)[None, :] + 0.5 - cx
                dy = np.arange(ya, yb, dtype=np.float64)[:, None] + 0.5 - cy
                u = dx * np.cos(angle) + dy * np.sin(angle)
                v = -dx * np.sin(angle) + dy * np.cos(angle)
                lumen[ya - y0:yb - y0, xa - x0:xb - x0] |= (u / major) ** 2 + (v / minor) ** 2 <= 1.0
                gland[ya - y0:yb - y0, xa - x0:xb - x0] |= (u / (major + rim)) ** 2 + (v / (minor + rim)) ** 2 <= 1.0
        return lumen, gland


def _texture(rng: np.random.Generator, h: int, w: int, sigma_px: float, stretch: float) -> np.ndarray:
    """Smooth unit-variance noise of (h, w); ``stretch`` > 1 elongates it along x."""
    noise = rng.standard_normal((h, w)).astype(np.float32)
    if stretch == 1.0:
        shade = cv2.GaussianBlur(noise, (0, 0), sigma_px)
    else:
        shade = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma_px * stretch, sigmaY=sigma_px)
    return shade / (shade.std() + 1e-6)


def paint_tissue(
    img: np.ndarray,
    mask: np.ndarray,
    look: Appearance,
    mpp: float,
    rng: np.random.Generator,
    *,
    origin: tuple[int, int] = (0, 0),
    seed: int = 0,
) -> None:
    """Paint tissue of appearance ``look`` into ``img`` ((h, w, 3) RGB uint8, in place) where
    ``mask`` ((h, w) bool) is set. ``mpp``: um per px of ``img`` (level 0 of the slide).

    Nuclei and vacuoles are placed by a Poisson draw per tile (expected count: the mask's
    area in um^2 times the density); a shape centred inside the mask may overhang its edge
    by its radius. A look with :class:`Glands` is painted as glands of ``look`` in its stroma;
    where they lie depends on ``origin`` (the level-0 px of ``img[0, 0]``) and ``seed`` only.
    """
    h, w = mask.shape
    if look.glands is not None:
        g = look.glands
        lumen, gland = g.masks(origin[0], origin[1], w, h, mpp, seed)
        paint_tissue(img, mask & ~gland, g.stroma, mpp, rng)
        paint_tissue(img, mask & gland & ~lumen, replace(look, glands=None), mpp, rng)
        inside = mask & lumen
        if inside.any():
            wisp = 4.0 * _texture(rng, h, w, max(1.0, 2.0 / mpp), 1.0)[inside]
            img[inside] = np.stack([c + wisp for c in g.lumen_rgb], axis=-1).clip(0, 255).astype(np.uint8)
        return
    shade = _texture(rng, h, w, max(1.0, look.texture_um / mpp), look.fibre_stretch)
    matrix = np.stack([b + a * shade for b, a in zip(look.base_rgb, look.shade_rgb)], axis=-1)
    img[mask] = matrix.clip(0, 255).astype(np.uint8)[mask]
    area_um2 = w * h * mpp * mpp
    if look.vacuoles_per_100um2 > 0:
        n = rng.poisson(area_um2 * look.vacuoles_per_100um2 / 100.0)
        cx, cy = rng.integers(0, w, n), rng.integers(0, h, n)
        radius = rng.uniform(*look.vacuole_radius_um, n) / mpp
        for a, b, r in zip(cx, cy, radius):
            if mask[b, a]:
                cv2.circle(img, (int(a), int(b)), max(1, int(round(r))), look.vacuole_rgb, -1, lineType=cv2.LINE_AA)
    n = rng.poisson(area_um2 * look.nuclei_per_100um2 / 100.0)
    cx = rng.integers(0, w, n)
    cy = rng.integers(0, h, n)
    inside = mask[cy, cx]
    lo, hi = look.nucleus_rgb_low, look.nucleus_rgb_high
    k = int(inside.sum())
    if look.round_nuclei:  # the demo's nuclei: one colour draw per channel and nucleus, in turn
        r = max(1, int(round(look.nucleus_radius_um[0] / mpp)))
        for a, b in zip(cx[inside], cy[inside]):
            col = tuple(int(rng.integers(lo[c], hi[c])) for c in range(3))
            cv2.circle(img, (int(a), int(b)), r, col, -1, lineType=cv2.LINE_AA)
        return
    colours = rng.integers(lo, hi, size=(k, 3)).tolist()
    major = rng.uniform(*look.nucleus_radius_um, k) / mpp
    minor = major / rng.uniform(*look.nucleus_aspect, k)
    angle = rng.uniform(*look.nucleus_angle_deg, k)
    for a, b, col, ma, mi, ang in zip(cx[inside], cy[inside], colours, major, minor, angle):
        axes = (max(1, int(round(ma))), max(1, int(round(mi))))
        cv2.ellipse(img, (int(a), int(b)), axes, float(ang), 0, 360, col, -1, lineType=cv2.LINE_AA)


def tissue_field(
    width: int,
    height: int,
    rng: np.random.Generator,
    n_blobs: int,
    *,
    centre: tuple[float, float] = (0.3, 0.7),
    radius: tuple[float, float] = (0.25, 0.4),
) -> np.ndarray:
    """Coarse float field (cells of :data:`COARSE` level-0 px) that is > 0.5 inside tissue:
    the union of ``n_blobs`` rotated Gaussian ellipses plus smooth noise. ``centre`` and
    ``radius`` are ranges as fractions of the slide's side."""
    gh, gw = height // COARSE + 2, width // COARSE + 2
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    field = np.zeros((gh, gw), np.float32)
    for _ in range(n_blobs):
        cx, cy = rng.uniform(*centre) * gw, rng.uniform(*centre) * gh
        rx, ry = rng.uniform(*radius) * gw, rng.uniform(*radius) * gh
        ang = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / rx
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ry
        field = np.maximum(field, np.exp(-(u**2 + v**2)))
    return field + 0.15 * smooth_noise(rng, (gh, gw), 2.0)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_cells: float) -> np.ndarray:
    """Gaussian-blurred standard normal noise on the coarse grid (not renormalised)."""
    return cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma_cells)


def sample_field(field: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear value of a coarse field at level-0 px centres: ``xs`` (W,) and ``ys`` (H,)
    are level-0 px indices; returns (H, W) float32."""
    fx = (np.asarray(xs, dtype=np.float32) + 0.5) / COARSE - 0.5
    fy = (np.asarray(ys, dtype=np.float32) + 0.5) / COARSE - 0.5
    mx, my = np.meshgrid(fx, fy)
    return cv2.remap(field, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def render_labels(
    x0: int, y0: int, labels: np.ndarray, looks: Sequence[Appearance], mpp: float, seed: int
) -> np.ndarray:
    """The level-0 box at ``(x0, y0)`` of ``labels`` ((h, w) int: index into ``looks``, -1
    glass) as (h, w, 3) RGB uint8, each kind painted with its appearance. The random draws
    depend on ``seed`` and the box's origin only, so a tile renders alike in any order."""
    h, w = labels.shape
    img = np.full((h, w, 3), GLASS_RGB, np.uint8)
    if not (labels >= 0).any():
        return img
    rng = np.random.default_rng([seed, x0, y0])
    for k, look in enumerate(looks):
        mask = labels == k
        if mask.any():
            paint_tissue(img, mask, look, mpp, rng, origin=(x0, y0), seed=seed)
    return img


def write_pyramid(
    path: str | Path,
    width: int,
    height: int,
    mpp: float,
    render: TileRenderer,
    *,
    min_level_px: int = 1024,
    quality: int = 85,
    description: str = "mrplip synthetic slide",
) -> Path:
    """Write the tiles of ``render`` as a pyramidal JPEG TIFF of ``width`` x ``height`` level-0
    px at ``mpp`` um/px, atomically.

    Levels have downsamples 1, 4, 16, ... until the level's longer side is below
    ``min_level_px``. Resolution tags hold ``1e4 / mpp`` px/cm.
    """
    level1 = np.zeros(((height + 3) // 4, (width + 3) // 4, 3), np.uint8)

    def level0_tiles() -> Iterator[np.ndarray]:
        for ty in range(0, height, TILE):
            for tx in range(0, width, TILE):
                tile = np.full((TILE, TILE, 3), 255, np.uint8)
                w, h = min(TILE, width - tx), min(TILE, height - ty)
                rendered = render(tx, ty, w, h)
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
            tif.write(level0_tiles(), shape=(height, width, 3), dtype=np.uint8, description=description, **opts)
            level, ds = level1, 4
            while max(level.shape[:2]) >= min_level_px // 4 and max(width, height) // ds >= min_level_px:
                tif.write(
                    level, subfiletype=1, resolution=(res[0] / ds, res[1] / ds), **{k: v for k, v in opts.items() if k != "resolution"}
                )
                level = cv2.resize(level, ((level.shape[1] + 3) // 4, (level.shape[0] + 3) // 4), interpolation=cv2.INTER_AREA)
                ds *= 4
    return out


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
    """Write the demo's synthetic pyramidal TIFF of ``width`` x ``height`` level-0 px at
    ``mpp`` um/px: :data:`DEMO_STROMA` inside ``n_blobs`` smooth blobs on glass.

    Levels have downsamples 1, 4, 16, ... until the level's longer side is below
    ``min_level_px``. Resolution tags hold ``1e4 / mpp`` px/cm. Written atomically.
    """
    field = tissue_field(width, height, np.random.default_rng(seed), n_blobs)

    def render(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        tissue = sample_field(field, np.arange(x0, x0 + w), np.arange(y0, y0 + h)) > 0.5
        return render_labels(x0, y0, np.where(tissue, 0, -1), (DEMO_STROMA,), mpp, seed)

    return write_pyramid(path, width, height, mpp, render, min_level_px=min_level_px, quality=quality)
