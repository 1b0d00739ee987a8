"""Planted-signal slides: tissue divided into smooth regions of known tissue kinds.

A benchmark of localisation (does a model's pooling over a slide's patches, conditioned on a
sentence, point at the region the sentence describes?) needs slides whose ground truth is
known. A planted slide is the demo's synthetic tissue (``wsi/synthetic.py``) divided into 2-3
irregular, smooth regions, each painted as one tissue kind (every length in um, so the
picture is physically consistent at any scan resolution). Two palettes (:data:`PALETTES`):
``tissue`` (:data:`KINDS`: five kinds distinct in colour, texture and nuclei at every
magnification) and ``architecture`` (:data:`ARCHITECTURE_KINDS`: glands or solid sheets,
seen at 5x, crossed with low- or high-grade nuclei, seen at 20-40x). The regions come from
one coarse layout (:class:`PlantedLayout`) that both the renderer and the ground truth
(:meth:`PlantedLayout.regions`, a GeoJSON in level-0 px) read, so the file and its annotation
cannot disagree by more than the annotation's raster cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrplip_core.wsi.regions import labels_to_geojson
from mrplip_core.wsi.synthetic import (
    COARSE,
    Appearance,
    Glands,
    render_labels,
    sample_field,
    smooth_noise,
    tissue_field,
    write_pyramid,
)

#: The tissue kinds a planted slide draws from, and how each is painted.
KINDS: dict[str, Appearance] = {
    # sheets of tumour cells: crowded large, dark, slightly irregular nuclei on purple-pink cytoplasm
    "tumour": Appearance(
        base_rgb=(200.0, 128.0, 186.0), shade_rgb=(10.0, 14.0, 10.0), texture_um=3.0,
        nuclei_per_100um2=2.2, nucleus_radius_um=(4.0, 5.5), nucleus_aspect=(1.0, 1.5),
        nucleus_rgb_low=(45, 20, 95), nucleus_rgb_high=(85, 50, 135)),
    # collagenous stroma: bright pink fibres along one direction, sparse spindle nuclei along them
    "stroma": Appearance(
        base_rgb=(238.0, 166.0, 200.0), shade_rgb=(10.0, 28.0, 14.0), texture_um=1.5, fibre_stretch=8.0,
        nuclei_per_100um2=0.25, nucleus_radius_um=(3.5, 5.0), nucleus_aspect=(3.0, 5.0),
        nucleus_angle_deg=(-15.0, 15.0), nucleus_rgb_low=(80, 45, 130), nucleus_rgb_high=(120, 75, 165)),
    # lymphoid infiltrate: densely packed small, round, very dark nuclei
    "lymphocytes": Appearance(
        base_rgb=(214.0, 160.0, 206.0), shade_rgb=(6.0, 10.0, 8.0), texture_um=3.0,
        nuclei_per_100um2=3.5, nucleus_radius_um=(2.2, 2.8), nucleus_aspect=(1.0, 1.1),
        nucleus_rgb_low=(35, 25, 100), nucleus_rgb_high=(65, 45, 135)),
    # necrosis: pale, blotchy eosinophilic matrix with fine nuclear dust, no intact nuclei
    "necrosis": Appearance(
        base_rgb=(240.0, 196.0, 214.0), shade_rgb=(8.0, 16.0, 10.0), texture_um=8.0,
        nuclei_per_100um2=1.5, nucleus_radius_um=(0.4, 1.1), nucleus_aspect=(1.0, 2.0),
        nucleus_rgb_low=(150, 90, 170), nucleus_rgb_high=(200, 130, 200)),
    # mucin: pale blue-grey wispy material with clear vacuoles and rare floating cells
    "mucin": Appearance(
        base_rgb=(206.0, 198.0, 228.0), shade_rgb=(8.0, 8.0, 6.0), texture_um=6.0, fibre_stretch=3.0,
        nuclei_per_100um2=0.1, nucleus_radius_um=(3.0, 4.0), nucleus_aspect=(1.5, 3.0),
        nucleus_rgb_low=(80, 45, 130), nucleus_rgb_high=(120, 75, 165),
        vacuoles_per_100um2=0.08, vacuole_radius_um=(4.0, 12.0), vacuole_rgb=(247, 245, 248)),
}


def _epithelium(nuclei_per_100um2: float, radius_um: tuple[float, float], aspect: tuple[float, float],
                glands: Glands | None) -> Appearance:
    """The architecture palette's epithelium: one cytoplasm and one nuclear colour range for
    every kind, so the grades differ only in the size, shape and number of nuclei."""
    return Appearance(
        base_rgb=(214.0, 150.0, 196.0), shade_rgb=(8.0, 12.0, 8.0), texture_um=3.0,
        nuclei_per_100um2=nuclei_per_100um2, nucleus_radius_um=radius_um, nucleus_aspect=aspect,
        nucleus_rgb_low=(55, 30, 110), nucleus_rgb_high=(95, 60, 145), glands=glands)


#: The stroma between the glands of the architecture palette: few nuclei, so that the epithelium's
#: nuclei are most of a glandular field's nuclei.
GLAND_STROMA = Appearance(
    base_rgb=(236.0, 170.0, 204.0), shade_rgb=(10.0, 24.0, 14.0), texture_um=1.5, fibre_stretch=6.0,
    nuclei_per_100um2=0.08, nucleus_radius_um=(3.5, 5.0), nucleus_aspect=(3.0, 5.0),
    nucleus_rgb_low=(80, 45, 130), nucleus_rgb_high=(120, 75, 165))
_GLANDS = Glands(stroma=GLAND_STROMA)
#: Nuclei of the two grades. Low grade: small, round, uniform (semi-axes 2.2-2.8 um); high grade:
#: large and pleomorphic (3.8-5.2 um, up to 1.8 x as long as wide). The densities give both the
#: same expected nuclear area per um^2, n A = 0.37 (overlaps counted twice; a Poisson pattern of
#: shapes of mean area A at density n covers 1 - exp(-n A), here 0.31, of the tissue), so at 5x
#: (2 um/px), where a nucleus is 2-5 px across, the grades have the same mean colour and differ
#: only slightly in texture; from 20x on their nuclei differ plainly in size, shape and count.
_LOW_GRADE = {"nuclei_per_100um2": 2.0, "radius_um": (2.2, 2.8), "aspect": (1.0, 1.15)}
_HIGH_GRADE = {"nuclei_per_100um2": 0.815, "radius_um": (3.8, 5.2), "aspect": (1.1, 1.8)}

#: The architecture palette: 2 architectures x 2 grades. A kind's architecture shows at low
#: magnification (glands of 110-215 um in stroma, or a solid sheet), its grade at high
#: magnification (the nuclei). Neither alone tells the four kinds apart.
ARCHITECTURE_KINDS: dict[str, Appearance] = {
    "glandular_low_grade": _epithelium(**_LOW_GRADE, glands=_GLANDS),
    "glandular_high_grade": _epithelium(**_HIGH_GRADE, glands=_GLANDS),
    "solid_low_grade": _epithelium(**_LOW_GRADE, glands=None),
    "solid_high_grade": _epithelium(**_HIGH_GRADE, glands=None),
}

#: The palettes a planted cohort draws its kinds from (kind names are unique across them).
PALETTES: dict[str, dict[str, Appearance]] = {"tissue": KINDS, "architecture": ARCHITECTURE_KINDS}
#: The level-0 um/px each palette is scanned at unless told otherwise: the tissue kinds at 20x;
#: the architecture kinds at 40x, since their grades differ in nuclei a few um across.
SCAN_MPP: dict[str, float] = {"tissue": 0.5, "architecture": 0.25}
#: Every planted kind by name.
ALL_KINDS: dict[str, Appearance] = {name: look for palette in PALETTES.values() for name, look in palette.items()}

#: Level-0 px per cell of a planted slide's region raster (and of its GeoJSON's vertices).
REGION_DOWNSAMPLE = 8


class PlantedLayoutError(ValueError):
    """No layout with every kind large enough was found (slide too small for its kinds)."""


@dataclass(frozen=True)
class PlantedLayout:
    """Where each tissue kind lies on a planted slide.

    ``tissue`` is the coarse tissue field (cells of :data:`~mrplip_core.wsi.synthetic.COARSE`
    level-0 px; tissue where > 0.5) and ``scores`` (K, gh, gw) one coarse score per kind: a
    level-0 px of tissue belongs to the kind whose bilinearly sampled score is highest, so
    region borders are smooth curves.
    """

    width: int  # level-0 px
    height: int  # level-0 px
    mpp: float  # um per level-0 px
    kinds: tuple[str, ...]
    tissue: np.ndarray
    scores: np.ndarray

    def labels(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """(len(ys), len(xs)) int labels at level-0 px ``xs`` x ``ys``: index into ``kinds``, -1 glass."""
        tissue = sample_field(self.tissue, xs, ys) > 0.5
        best = np.stack([sample_field(s, xs, ys) for s in self.scores]).argmax(axis=0)
        return np.where(tissue, best, -1)

    def label_raster(self, downsample: int = REGION_DOWNSAMPLE) -> np.ndarray:
        """Labels at the centres of cells of ``downsample`` level-0 px (cell ``(i, j)`` centred
        on level-0 ``((j + 0.5) * downsample, (i + 0.5) * downsample)``)."""
        xs = np.arange(0, self.width, downsample) + (downsample - 1) / 2
        ys = np.arange(0, self.height, downsample) + (downsample - 1) / 2
        return self.labels(xs, ys)

    def regions(self, slide_id: str, downsample: int = REGION_DOWNSAMPLE) -> dict[str, Any]:
        """Each kind's region as GeoJSON polygons in level-0 px (property ``kind``)."""
        return labels_to_geojson(self.label_raster(downsample), downsample, self.kinds, slide_id)

    def shares(self, downsample: int = REGION_DOWNSAMPLE) -> dict[str, float]:
        """Each kind's share of the tissue area (0..1), in ``kinds`` order."""
        labels = self.label_raster(downsample)
        tissue = max(1, int((labels >= 0).sum()))
        return {kind: float((labels == k).sum() / tissue) for k, kind in enumerate(self.kinds)}

    def areas_mm2(self, downsample: int = REGION_DOWNSAMPLE) -> dict[str, float]:
        """Each kind's area in mm^2."""
        labels = self.label_raster(downsample)
        cell_mm2 = (downsample * self.mpp / 1000.0) ** 2
        return {kind: float((labels == k).sum() * cell_mm2) for k, kind in enumerate(self.kinds)}


def plan_layout(
    width: int,
    height: int,
    mpp: float,
    kinds: Sequence[str],
    rng: np.random.Generator,
    *,
    min_share: float | None = None,
    attempts: int = 50,
) -> PlantedLayout:
    """Draw a layout of ``kinds`` on a ``width`` x ``height`` level-0 px slide at ``mpp`` um/px.

    Tissue: the union of two large smooth blobs (about 60 % of the slide). Regions: a
    weighted Voronoi partition of the tissue around one seed point per kind, with a random
    weight per kind (so the kinds' areas differ) and smooth noise on each score (so borders
    wander). Layouts where a kind gets less than ``min_share`` of the tissue (default:
    ``0.5 / len(kinds)``) are redrawn, up to ``attempts`` times.
    """
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct names of {sorted(ALL_KINDS)}, got {list(kinds)}")
    floor = 0.5 / len(kinds) if min_share is None else min_share
    for _ in range(attempts):
        tissue = tissue_field(width, height, rng, 2, centre=(0.42, 0.58), radius=(0.5, 0.62))
        gh, gw = tissue.shape
        cells = np.argwhere(tissue > 0.6)
        if len(cells) < len(kinds):
            continue
        # seeds: the most spread-out of a few random draws of tissue cells
        draws = [cells[rng.choice(len(cells), len(kinds), replace=False)] for _ in range(8)]
        seeds = max(draws, key=lambda d: min((np.hypot(*(a - b)) for i, a in enumerate(d) for b in d[i + 1:]),
                                             default=0.0))
        weights = rng.uniform(0.6, 1.6, len(kinds))
        yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
        scale = float(np.hypot(gh, gw))
        scores = np.stack([
            -np.hypot(yy - sy, xx - sx) / (w * scale) + 0.06 * smooth_noise(rng, (gh, gw), 3.0)
            for (sy, sx), w in zip(seeds, weights)
        ]).astype(np.float32)
        layout = PlantedLayout(width, height, mpp, tuple(kinds), tissue, scores)
        if min(layout.shares(downsample=COARSE // 4).values()) >= floor:
            return layout
    raise PlantedLayoutError(f"no layout of {list(kinds)} with every kind >= {floor:.0%} of the tissue "
                             f"in {attempts} attempts ({width} x {height} px)")


def write_planted_slide(path: str | Path, layout: PlantedLayout, *, seed: int = 0, quality: int = 85) -> Path:
    """Render ``layout`` as a pyramidal JPEG TIFF at ``layout.mpp`` um/px (written atomically;
    the same layout and ``seed`` give the same file)."""
    looks = [ALL_KINDS[k] for k in layout.kinds]

    def render(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        labels = layout.labels(np.arange(x0, x0 + w), np.arange(y0, y0 + h))
        return render_labels(x0, y0, labels, looks, layout.mpp, seed)

    return write_pyramid(path, layout.width, layout.height, layout.mpp, render, quality=quality,
                         description="mrplip planted slide")
