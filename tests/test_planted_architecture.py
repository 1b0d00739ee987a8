"""The architecture palette of planted slides: glands or solid sheets (seen at 5x) crossed with
low- or high-grade nuclei (seen from 20x on), for the ablation of multi-resolution pretraining.

Measured with the morphology captioner's own measurements (captions/morphology.py), the same
numbers the pretraining captions are written from."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pandas as pd
import pytest

from mrplip_core.captions.morphology import measure
from mrplip_core.pathflip.planted import (
    CONFIG_OVERRIDES,
    TEMPLATES,
    CohortFiles,
    config_overrides,
    write_planted_cohort,
)
from mrplip_core.wsi.planted import ALL_KINDS, ARCHITECTURE_KINDS, KINDS, PALETTES
from mrplip_core.wsi.synthetic import render_labels

MPP = 0.5  # um/px of the painted field (20x)
SIDE = 2048  # px: 1.024 mm, one 5x patch


def field(kind: str, seed: int = 0, side: int = SIDE) -> np.ndarray:
    """``side`` x ``side`` px of ``kind`` at 20x, rendered tile by tile as a slide is."""
    img = np.zeros((side, side, 3), np.uint8)
    for y, x in itertools.product(range(0, side, 256), repeat=2):
        img[y:y + 256, x:x + 256] = render_labels(x, y, np.zeros((256, 256), int), [ARCHITECTURE_KINDS[kind]], MPP, seed)
    return img


@pytest.fixture(scope="module")
def fields() -> dict[str, np.ndarray]:
    return {k: field(k) for k in ARCHITECTURE_KINDS}


def at_5x(img: np.ndarray) -> np.ndarray:
    """The 1.024 mm field as a 5x patch: 512 px at 2 um/px."""
    return cv2.resize(img, (512, 512), interpolation=cv2.INTER_AREA)


def test_glands_join_seamlessly_across_tiles() -> None:
    """A gland is drawn from (seed, lattice cell) alone: a box's masks equal its quarters' masks."""
    glands = ARCHITECTURE_KINDS["glandular_low_grade"].glands
    lumen, gland = glands.masks(300, 700, 800, 600, MPP, seed=5)
    assert lumen.any() and (gland & ~lumen).any() and not gland.all()
    for x, y in itertools.product((0, 400), (0, 300)):
        ql, qg = glands.masks(300 + x, 700 + y, 400, 300, MPP, seed=5)
        assert np.array_equal(ql, lumen[y:y + 300, x:x + 400]) and np.array_equal(qg, gland[y:y + 300, x:x + 400])
    other, _ = glands.masks(300, 700, 800, 600, MPP, seed=6)
    assert not np.array_equal(other, lumen)


def test_architecture_shows_at_5x(fields) -> None:
    """Glandular kinds have many lumina in a 5x patch; solid kinds none."""
    lumina = {k: measure(at_5x(img), 2.0).lumina for k, img in fields.items()}
    assert lumina["glandular_low_grade"] >= 8 and lumina["glandular_high_grade"] >= 8, lumina
    assert lumina["solid_low_grade"] == 0 and lumina["solid_high_grade"] == 0, lumina


def test_grade_shows_in_nuclei_at_20x_not_in_colour_at_5x(fields) -> None:
    """Same architecture, other grade: the same mean colour at 5x (within 4 of 255 per channel),
    nuclei over 1.5 x as large in median area at 20x."""
    for arch in ("glandular", "solid"):
        low, high = fields[f"{arch}_low_grade"], fields[f"{arch}_high_grade"]
        gap = np.abs(at_5x(low).reshape(-1, 3).mean(0) - at_5x(high).reshape(-1, 3).mean(0))
        assert gap.max() < 4, (arch, gap.round(1))
        # a 20x patch (512 px) inside the field; for glands, one centred on epithelium is not
        # guaranteed, so the whole field is measured at 20x
        area_low = measure(low, MPP).nucleus_area_um2
        area_high = measure(high, MPP).nucleus_area_um2
        assert area_high > 1.5 * area_low, (arch, area_low, area_high)


def test_kinds_are_unique_across_palettes_and_the_cli_offers_every_palette() -> None:
    assert len(ALL_KINDS) == sum(len(p) for p in PALETTES.values())
    assert set(PALETTES) == {"tissue", "architecture"} and PALETTES["tissue"] is KINDS
    assert set(TEMPLATES) == set(ALL_KINDS)  # every kind can be captioned
    from mrplip_core.cli import build_parser

    for palette in PALETTES:
        args = build_parser().parse_args(["planted-cohort", "--out", "x", "--slides", "1", "--palette", palette])
        assert args.palette == palette


def test_a_40x_cohort_tiles_and_pretrains_at_40x_too() -> None:
    assert config_overrides(0.5) == CONFIG_OVERRIDES
    assert config_overrides(1.0) == CONFIG_OVERRIDES
    over = config_overrides(0.25)
    assert over["tiling"]["magnifications"] == [5, 10, 20, 40]
    assert over["pretrain"]["data"] == {"magnifications": [5, 10, 20, 40], "patches_per_magnification": [1, 2, 2, 2]}
    assert over["pretrain"]["run"] == CONFIG_OVERRIDES["pretrain"]["run"]  # the rest as for 20x


def test_an_architecture_cohort_draws_its_kinds_from_the_palette(tmp_path) -> None:
    truth = write_planted_cohort(tmp_path / "c", 3, 4, size_mm=1.1, mpp=0.5, palette="architecture")
    assert set(truth["kind"]) <= set(ARCHITECTURE_KINDS) and len(set(truth["kind"])) >= 2
    table = pd.read_csv(CohortFiles(tmp_path / "c").table, sep="\t")
    for caption, kinds in zip(table["caption"], table["kinds"]):
        for kind in kinds.split(","):
            assert any(t in caption for t in TEMPLATES[kind])
    with pytest.raises(ValueError, match="palette"):
        write_planted_cohort(tmp_path / "d", 1, palette="organs")


@pytest.mark.parametrize(("palette", "mpp"), [("architecture", 0.25), ("tissue", 0.5)])
def test_the_cli_scans_each_palette_at_its_magnification_unless_told(tmp_path, capsys, palette, mpp) -> None:
    """Without --mpp the architecture cohort is a 40x scan (its grades show from 20x on and its
    config then tiles 40x too) and the tissue cohort a 20x one; --mpp overrides either."""
    from mrplip_core.cli import main

    assert main(["planted-cohort", "--out", str(tmp_path / "a"), "--slides", "1", "--size-mm", "1.1",
                 "--palette", palette]) == 0
    assert pd.read_csv(CohortFiles(tmp_path / "a").table, sep="\t")["mpp"].tolist() == [mpp]
    assert f"at {mpp} um/px" in capsys.readouterr().out
    assert main(["planted-cohort", "--out", str(tmp_path / "b"), "--slides", "1", "--size-mm", "1.1",
                 "--palette", palette, "--mpp", "1.0"]) == 0
    assert pd.read_csv(CohortFiles(tmp_path / "b").table, sep="\t")["mpp"].tolist() == [1.0]
