"""The ``morphology`` captioner: an offline, deterministic description of what can be measured.

This is not a language model and does not pretend to be one: it measures a patch and writes
those measurements as sentences, so the embedded demo run has captions (and textual bags)
without a GPU or model weights. Rows it writes say ``backend = morphology`` and
``model = MODEL_ID``.

Measurements (all on the RGB patch, with the patch's um/px):

- *stain balance*: Ruifrok & Johnston colour deconvolution (Anal. Quant. Cytol. Histol. 2001)
  into hematoxylin and eosin optical densities, implemented with numpy;
- *tissue fraction*: pixels with a total optical density above background;
- *nuclei*: connected hematoxylin-dense blobs of nuclear size (um^2), their density per mm^2
  of tissue, size, variation in size and elongation;
- *texture*: gradient energy and orientation coherence (aligned fibres vs isotropic), and
  clear lumen-like spaces enclosed by tissue.

Wording follows the prompts: below 20x the sentences are about architecture (tissue,
fragments, lumina, cellular regions, texture), from 20x up about cells (nuclei, chromatin,
cytoplasm).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np

MODEL_ID = "mrplip-morphology-v1"

#: Ruifrok & Johnston (2001) optical density vectors of hematoxylin and eosin (RGB).
HE_STAIN_VECTORS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], dtype=np.float64)

#: Magnification (x) from which sentences describe cells rather than architecture.
CELL_LEVEL_MAGNIFICATION = 20.0

BACKGROUND_OD = 0.15  # total optical density below this is glass/background
NUCLEUS_MIN_UM2 = 12.0  # smaller hematoxylin blobs are noise or debris
NUCLEUS_MAX_UM2 = 250.0  # larger blobs are clusters, not single nuclei
LUMEN_MIN_UM2 = 200.0  # enclosed clear spaces at least this large count as lumen-like


def stain_matrix() -> np.ndarray:
    """3x3 matrix whose rows are unit OD vectors: hematoxylin, eosin, and their cross product."""
    he = HE_STAIN_VECTORS / np.linalg.norm(HE_STAIN_VECTORS, axis=1, keepdims=True)
    third = np.cross(he[0], he[1])
    third /= np.linalg.norm(third)
    return np.vstack([he, third])


_UNMIX = np.linalg.inv(stain_matrix())
#: Optical density of each 8-bit intensity: -log10(max(I, 1) / 255).
_OD_LUT = (-np.log10(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)).astype(np.float32)
#: Per channel c and stain s, the contribution of each intensity: OD(I) * unmix[c, s].
_STAIN_LUT = (_OD_LUT[None, :, None] * _UNMIX[:, None, :]).astype(np.float32)  # (3 channels, 256, 3 stains)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel optical density ``-log10(I / 255)`` (I clipped to >= 1), float32 (H, W, 3)."""
    return _OD_LUT[rgb]


def deconvolve_he(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ruifrok-Johnston colour deconvolution of an RGB uint8 image.

    Solves ``OD = C @ M`` per pixel (``M``: :func:`stain_matrix`) for the stain
    concentrations ``C``. Returns ``(hematoxylin, eosin, residual)`` in optical-density
    units, each float32 (H, W), clipped at 0. Computed with per-channel lookup tables, so
    it costs three gathers per stain instead of a logarithm per pixel.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    out = []
    for s in range(3):
        conc = _STAIN_LUT[0, :, s][r] + _STAIN_LUT[1, :, s][g] + _STAIN_LUT[2, :, s][b]
        out.append(np.maximum(conc, 0.0))
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class Measurements:
    """What :func:`measure` finds in one patch (units in the names)."""

    field_um: float  # side of the field in um
    tissue_fraction: float  # 0..1 of the field
    tissue_fragments: int  # connected tissue regions (>= 2% of the field)
    hematoxylin_od: float  # mean H optical density over tissue
    eosin_od: float  # mean E optical density over tissue
    hematoxylin_share: float  # H / (H + E) over tissue, 0..1
    dense_fraction: float  # fraction of tissue that is hematoxylin-dense (cellular)
    nuclei: int  # nucleus-sized hematoxylin blobs
    nuclei_per_mm2: float  # per mm^2 of tissue
    nucleus_area_um2: float  # median area
    nucleus_size_cv: float  # coefficient of variation of areas
    nucleus_elongation: float  # median major/minor axis ratio
    nuclear_hematoxylin_od: float  # mean H optical density inside hematoxylin-dense pixels
    lumina: int  # clear spaces enclosed by tissue (>= LUMEN_MIN_UM2)
    texture_energy: float  # mean gradient magnitude of the OD image over tissue
    coherence: float  # 0 (isotropic) .. 1 (all edges aligned)


def measure(rgb: np.ndarray, mpp: float) -> Measurements:
    """Measure an RGB uint8 patch whose pixels are ``mpp`` um wide."""
    h, w = rgb.shape[:2]
    px_um2 = mpp * mpp
    hem, eos, _ = deconvolve_he(rgb)
    od_total = _OD_LUT[rgb[..., 0]] + _OD_LUT[rgb[..., 1]] + _OD_LUT[rgb[..., 2]]
    tissue = od_total > BACKGROUND_OD
    n_tissue = int(tissue.sum())
    tissue_fraction = n_tissue / float(h * w)

    # tissue fragments: connected regions of a slightly closed mask, ignoring specks
    closed = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    n_lab, _, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    fragments = int(np.sum(stats[1:, cv2.CC_STAT_AREA] >= 0.02 * h * w)) if n_lab > 1 else 0

    if n_tissue == 0:
        return Measurements(w * mpp, 0.0, 0, 0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0)

    h_mean = float(hem[tissue].mean())
    e_mean = float(eos[tissue].mean())
    share = h_mean / (h_mean + e_mean) if h_mean + e_mean > 0 else 0.0

    # hematoxylin-dense pixels: above both an absolute floor and the tissue's own Otsu level
    sigma = max(0.5, 0.5 / mpp)  # smooth over about half a micron
    hs = cv2.GaussianBlur(hem, (0, 0), sigma)
    h8 = np.clip(hs / 1.5 * 255.0, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(h8[tissue].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    level = max(otsu / 255.0 * 1.5, 0.25)
    dense = (hs > level) & tissue
    dense_fraction = float(dense.sum()) / n_tissue

    n_nuc, areas, elong = _nuclei(dense, px_um2)
    tissue_mm2 = n_tissue * px_um2 / 1e6

    # texture on the total OD image (inside tissue)
    gx = cv2.Sobel(od_total, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(od_total, cv2.CV_32F, 0, 1, ksize=3)
    energy = float(np.hypot(gx, gy)[tissue].mean())
    jxx, jyy, jxy = float((gx * gx)[tissue].sum()), float((gy * gy)[tissue].sum()), float((gx * gy)[tissue].sum())
    coherence = float(np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy)) if jxx + jyy > 0 else 0.0

    return Measurements(
        field_um=w * mpp,
        tissue_fraction=tissue_fraction,
        tissue_fragments=fragments,
        hematoxylin_od=h_mean,
        eosin_od=e_mean,
        hematoxylin_share=share,
        dense_fraction=dense_fraction,
        nuclei=n_nuc,
        nuclei_per_mm2=n_nuc / tissue_mm2 if tissue_mm2 > 0 else 0.0,
        nucleus_area_um2=float(np.median(areas)) if areas.size else 0.0,
        nucleus_size_cv=float(areas.std() / areas.mean()) if areas.size > 1 else 0.0,
        nucleus_elongation=float(np.median(elong)) if areas.size else 0.0,
        nuclear_hematoxylin_od=float(hem[dense].mean()) if dense.any() else 0.0,
        lumina=_lumina(tissue, px_um2),
        texture_energy=energy,
        coherence=coherence,
    )


def _nuclei(dense: np.ndarray, px_um2: float) -> tuple[int, np.ndarray, np.ndarray]:
    """Nuclei in the hematoxylin-dense mask: count, areas (um^2) and elongations of single ones.

    Connected components of nuclear size are single nuclei. Larger components are clumps of
    touching nuclei and count as ``area / median single-nucleus area`` nuclei (40 um^2 when
    no single nucleus is found); smaller ones are noise.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(dense.astype(np.uint8), connectivity=8)
    if n <= 1:
        return 0, np.zeros(0), np.zeros(0)
    area_px = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    area_um2 = area_px * px_um2
    keep = (area_um2 >= NUCLEUS_MIN_UM2) & (area_um2 <= NUCLEUS_MAX_UM2) & (area_px >= 4)
    clumps = area_um2[(area_um2 > NUCLEUS_MAX_UM2) & (area_px >= 4)]
    single = float(np.median(area_um2[keep])) if keep.any() else 40.0
    in_clumps = int(np.round(clumps / single).sum())
    if not keep.any():
        return in_clumps, np.zeros(0), np.zeros(0)
    # second moments per component -> axis ratio
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    cnt = np.bincount(lab, minlength=n).astype(np.float64)
    cnt[0] = 1.0
    mx, my = np.bincount(lab, xs, n) / cnt, np.bincount(lab, ys, n) / cnt
    dx, dy = xs - mx[lab], ys - my[lab]
    sxx = np.bincount(lab, dx * dx, n) / cnt + 1 / 12
    syy = np.bincount(lab, dy * dy, n) / cnt + 1 / 12
    sxy = np.bincount(lab, dx * dy, n) / cnt
    tr, det = sxx + syy, sxx * syy - sxy**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0.0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-6)
    elong = np.sqrt(l1 / l2)[1:]
    return int(keep.sum()) + in_clumps, area_um2[keep], elong[keep]


def _lumina(tissue: np.ndarray, px_um2: float) -> int:
    """Clear regions fully enclosed by tissue (not touching the border), at least LUMEN_MIN_UM2."""
    clear = (~tissue).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(clear, connectivity=4)
    if n <= 1:
        return 0
    h, w = tissue.shape
    x, y = stats[1:, cv2.CC_STAT_LEFT], stats[1:, cv2.CC_STAT_TOP]
    bw, bh = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]
    inside = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
    big = stats[1:, cv2.CC_STAT_AREA] * px_um2 >= LUMEN_MIN_UM2
    return int(np.sum(inside & big))


# -- wording --------------------------------------------------------------------------------
def _pct(f: float) -> str:
    return f"{100 * f:.0f}%"


def _stain_sentence(m: Measurements, subject: str) -> str:
    verb = "looks" if subject == "the tissue" else "look"
    if m.hematoxylin_share >= 0.75:
        return f"The staining is hematoxylin-dominant: {subject} {verb} basophilic and purple."
    if m.hematoxylin_share <= 0.58:
        return f"The staining is eosin-dominant: {subject} {verb} eosinophilic and pink."
    return "Hematoxylin and eosin are balanced, with purple cellular and pink stromal areas."


def _texture_sentence(m: Measurements) -> str:
    if m.coherence >= 0.4:
        return "The texture is fibrillar, with aligned, streaming fibres."
    if m.texture_energy >= 2.0:
        return "The texture is coarse and heterogeneous."
    if m.texture_energy >= 0.8:
        return "The texture is finely granular."
    return "The texture is smooth and homogeneous."


def describe(m: Measurements, magnification: float) -> str:
    """Sentences for measurements ``m`` of a patch at ``magnification`` (x)."""
    mag = f"{magnification:g}x"
    width = f"{m.field_um / 1000:.2f} mm" if m.field_um >= 1000 else f"{m.field_um:.0f} um"
    low = magnification < CELL_LEVEL_MAGNIFICATION
    view = "Low-magnification" if low else "High-magnification"
    out = [f"{view} view ({mag}) of a field about {width} wide."]
    if m.tissue_fraction < 0.02:
        out.append("The field is almost entirely background, with no tissue to describe.")
        return " ".join(out)
    extent = "fills the field" if m.tissue_fraction >= 0.9 else f"covers {_pct(m.tissue_fraction)} of the field"
    if low:
        frag = "" if m.tissue_fragments <= 1 else f", in {m.tissue_fragments} separate fragments"
        out.append(f"Tissue {extent}{frag}.")
        out.append(_stain_sentence(m, "most areas"))
        if m.dense_fraction >= 0.45:
            out.append(f"Cellular, hematoxylin-dense regions are extensive ({_pct(m.dense_fraction)} of the tissue).")
        elif m.dense_fraction >= 0.15:
            out.append(f"Cellular, hematoxylin-dense regions occupy {_pct(m.dense_fraction)} of the tissue, "
                       "between paler stroma.")
        else:
            out.append("Cellularity is low; the tissue is mostly pale, paucicellular stroma or matrix.")
        if m.lumina >= 3:
            out.append(f"There are {m.lumina} clear lumen-like or vacuolated spaces within the tissue.")
        elif m.lumina:
            out.append("A clear lumen-like space is enclosed by the tissue." if m.lumina == 1
                       else "Two clear lumen-like spaces are enclosed by the tissue.")
        out.append(_texture_sentence(m))
        return " ".join(out)

    out.append(f"Tissue {extent}.")
    if m.nuclei == 0:
        out.append("No distinct nuclei are resolved; the tissue is acellular or nuclei are out of focus.")
    else:
        if m.nuclei_per_mm2 >= 10000:
            density = "densely packed"
        elif m.nuclei_per_mm2 >= 4000:
            density = "moderately dense"
        else:
            density = "sparse"
        out.append(f"About {m.nuclei} nuclei are detected ({m.nuclei_per_mm2:,.0f} per mm2 of tissue): "
                   f"the cells are {density}.")
        size = "small" if m.nucleus_area_um2 < 30 else ("enlarged" if m.nucleus_area_um2 > 80 else "medium-sized")
        shape = "elongated, spindle-shaped" if m.nucleus_elongation >= 2.5 else (
            "oval" if m.nucleus_elongation >= 1.6 else "round")
        out.append(f"Nuclei are mostly {size} and {shape} (median area {m.nucleus_area_um2:.0f} um2).")
        if m.nucleus_size_cv >= 0.8:
            out.append("Nuclear size varies markedly (pleomorphism).")
        elif m.nucleus_size_cv <= 0.35:
            out.append("Nuclear size is uniform.")
        od = m.nuclear_hematoxylin_od
        chrom = "hyperchromatic, dark" if od >= 1.1 else ("pale, vesicular" if od < 0.6 else "moderately stained")
        out.append(f"Chromatin appears {chrom}.")
    out.append(_stain_sentence(m, "the tissue"))
    out.append(_texture_sentence(m))
    return " ".join(out)


def caption_patch(rgb: np.ndarray, magnification: float, mpp: float) -> str:
    """The morphology caption of an RGB uint8 patch at ``magnification`` x and ``mpp`` um/px."""
    return describe(measure(rgb, mpp), magnification)


def params_json() -> str:
    """The ``params`` column of morphology rows: the captioner's version and thresholds."""
    return json.dumps(
        {
            "captioner": MODEL_ID,
            "stain_vectors": "ruifrok-johnston-2001",
            "background_od": BACKGROUND_OD,
            "nucleus_um2": [NUCLEUS_MIN_UM2, NUCLEUS_MAX_UM2],
            "lumen_min_um2": LUMEN_MIN_UM2,
            "cell_level_magnification": CELL_LEVEL_MAGNIFICATION,
        },
        sort_keys=True,
    )


def measurements_dict(m: Measurements) -> dict[str, float]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(m).items()}
