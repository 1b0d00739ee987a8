"""The offline morphology captioner on real H&E tiles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mrplip_core.captions import morphology
from mrplip_core.captions.morphology import caption_patch, deconvolve_he, measure, stain_matrix


def test_ruifrok_johnston_recovers_known_stain_amounts():
    m = stain_matrix()
    # a pixel made of 0.8 OD of hematoxylin and 0.3 of eosin (Beer-Lambert: OD adds up)
    od = 0.8 * m[0] + 0.3 * m[1]
    rgb = np.clip(np.round(255 * 10 ** (-od)), 0, 255).astype(np.uint8)[None, None, :]
    h, e, r = deconvolve_he(rgb)
    assert h[0, 0] == pytest.approx(0.8, abs=0.02)
    assert e[0, 0] == pytest.approx(0.3, abs=0.02)
    assert r[0, 0] == pytest.approx(0.0, abs=0.02)


def test_lookup_tables_match_the_direct_formula():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    od = -np.log10(np.maximum(rgb.astype(np.float64), 1) / 255)
    ref = np.maximum(od.reshape(-1, 3) @ np.linalg.inv(stain_matrix()), 0).reshape(40, 40, 3)
    for i, got in enumerate(deconvolve_he(rgb)):
        np.testing.assert_allclose(got, ref[..., i], atol=1e-5)


@pytest.fixture(scope="module")
def nct(shared_data):
    root = shared_data / "tiles" / "nct_crc_he_100k_samples"
    labels = pd.read_csv(root / "labels.csv")
    return {lab: np.asarray(Image.open(root / p).convert("RGB")) for p, lab in zip(labels.path, labels.label)}


def test_measurements_follow_the_tissue_class(nct):
    m = {k: measure(v, 0.5) for k, v in nct.items()}  # NCT-CRC-HE tiles are 0.5 um/px
    assert m["BACK"].tissue_fraction < 0.05
    assert m["LYM"].tissue_fraction > 0.9
    # lymphocytes: dense, small, dark nuclei; smooth muscle: few nuclei, aligned fibres
    assert m["LYM"].nuclei_per_mm2 > 2 * m["STR"].nuclei_per_mm2 > 2 * m["MUS"].nuclei_per_mm2
    assert m["LYM"].nucleus_area_um2 < m["MUS"].nucleus_area_um2
    assert m["LYM"].hematoxylin_share > m["STR"].hematoxylin_share
    assert m["MUS"].coherence > 2 * m["LYM"].coherence
    assert m["MUS"].nucleus_elongation > m["NORM"].nucleus_elongation


def test_captions_describe_what_was_measured(nct):
    lym = caption_patch(nct["LYM"], 20, 0.5)
    assert "densely packed" in lym and "hyperchromatic" in lym and "hematoxylin-dominant" in lym
    assert "fibrillar" in caption_patch(nct["MUS"], 20, 0.5)
    assert "background" in caption_patch(nct["BACK"], 20, 0.5)


def test_wording_follows_magnification_and_is_deterministic(nct):
    img = nct["NORM"]
    low, high = caption_patch(img, 5, 2.0), caption_patch(img, 40, 0.25)
    assert low.startswith("Low-magnification view (5x)") and "nuclei" not in low
    assert high.startswith("High-magnification view (40x)") and "nuclei" in high
    assert "448 um" in low and "56 um" in high  # 224 px x 2.0 / 0.25 um/px
    assert caption_patch(img, 40, 0.25) == high


def test_params_name_the_captioner():
    assert '"captioner": "mrplip-morphology-v1"' in morphology.params_json()
