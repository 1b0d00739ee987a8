"""The planted-signal cohort: slides of known tissue kinds in known regions, captions whose
sentences each name one region, and the functions a localisation benchmark scores with.

The fast tests render small slides (1.5-2 mm at 1 um/px); the slow one writes a cohort with
`mrplip planted-cohort` and runs the real workflow on it (`snakemake` tiles and the demo
encoder's image features) and checks that every kind gets patches and that the encoder's
features tell the kinds apart.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import jsonschema
import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from mrplip_core.cli import main
from mrplip_core.config_schema import load_schema
from mrplip_core.evaluation.metrics import (
    caption_slide_retrieval,
    localization_auroc,
    localization_metrics,
    pointing_hit,
    retrieval_chance,
)
from mrplip_core.layout import Layout
from mrplip_core.pathflip.planted import TEMPLATES, CohortFiles, check_split, planted_caption, write_planted_cohort
from mrplip_core.pathflip.subcaptions import split_caption, subcaption_table
from mrplip_core.wsi.planted import KINDS, REGION_DOWNSAMPLE, plan_layout, write_planted_slide
from mrplip_core.wsi.regions import BACKGROUND, patch_truth, read_regions, region_masks
from mrplip_core.wsi.synthetic import GLASS_RGB, paint_tissue
from mrplip_core.wsi.table import read_slide_table

REPO = Path(__file__).resolve().parents[1]


def kind_stats(img: np.ndarray) -> np.ndarray:
    """Mean R, G, B; share of nuclear (dark) pixels x 100; vertical / horizontal gradient x 10."""
    f = img.astype(np.float64).reshape(-1, img.shape[-1])
    grey = img.astype(np.float64).mean(-1)
    aniso = np.abs(np.diff(grey, axis=0)).mean() / (np.abs(np.diff(grey, axis=1)).mean() + 1e-9)
    return np.array([*f.mean(0), 100 * (f.max(-1) < 150).mean(), 10 * aniso])


def painted(kind: str, px: int = 512, mpp: float = 0.5, seed: int = 0) -> np.ndarray:
    img = np.full((px, px, 3), GLASS_RGB, np.uint8)
    paint_tissue(img, np.ones((px, px), bool), KINDS[kind], mpp, np.random.default_rng(seed))
    return img


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, object, dict]:
    """A 2 x 2 mm planted slide at 1 um/px with three kinds, and its regions."""
    out = tmp_path_factory.mktemp("planted")
    layout = plan_layout(2000, 2000, 1.0, ["tumour", "stroma", "mucin"], np.random.default_rng(3))
    path = write_planted_slide(out / "s.tiff", layout, seed=3)
    regions = layout.regions("s")
    (out / "s.geojson").write_text(json.dumps(regions))
    return path, layout, regions


def test_rendering_is_deterministic(slide, tmp_path) -> None:
    path, layout, _ = slide
    again = plan_layout(2000, 2000, 1.0, ["tumour", "stroma", "mucin"], np.random.default_rng(3))
    assert np.array_equal(again.scores, layout.scores) and np.array_equal(again.tissue, layout.tissue)
    assert write_planted_slide(tmp_path / "s.tiff", again, seed=3).read_bytes() == path.read_bytes()
    other = write_planted_slide(tmp_path / "o.tiff", again, seed=4)
    assert other.read_bytes() != path.read_bytes()


def test_every_kind_differs_measurably_in_colour_nuclei_or_texture() -> None:
    stats = {k: kind_stats(painted(k)) for k in KINDS}
    # the same kind drawn with another seed is close; any two kinds are far apart
    for k in KINDS:
        assert np.abs(kind_stats(painted(k, seed=1)) - stats[k]).max() < 4, k
    for a, b in itertools.combinations(KINDS, 2):
        assert np.abs(stats[a] - stats[b]).max() > 12, (a, b, stats[a].round(1), stats[b].round(1))
    # what each kind is meant to look like
    assert stats["tumour"][3] > 50 and stats["lymphocytes"][3] > 30  # crowded nuclei
    assert stats["necrosis"][3] < 1 and stats["mucin"][3] < 3  # no intact nuclei
    assert stats["stroma"][4] > 25  # fibres: texture varies across them far more than along them
    assert stats["necrosis"][:3].mean() > stats["stroma"][:3].mean()  # pale


def test_geojson_is_valid_and_its_regions_are_the_drawn_tissue(slide) -> None:
    path, layout, regions = slide
    assert regions["type"] == "FeatureCollection"
    assert {f["properties"]["kind"] for f in regions["features"]} == set(layout.kinds)
    for f in regions["features"]:
        assert f["geometry"]["type"] == "Polygon"
        for i, ring in enumerate(f["geometry"]["coordinates"]):
            pts = np.asarray(ring)
            assert len(pts) >= 4 and (pts[0] == pts[-1]).all()  # closed
            x, y = pts[:, 0], pts[:, 1]
            signed = np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])
            assert (signed > 0) == (i == 0)  # outline one way, holes the other
            assert x.min() >= 0 and y.min() >= 0 and x.max() <= 2000 and y.max() <= 2000
    # polygons rasterised again are the layout's label raster (vertices: boundary cell centres)
    labels = layout.label_raster()
    masks = region_masks(regions, labels.shape, REGION_DOWNSAMPLE)
    for k, kind in enumerate(layout.kinds):
        truth, got = labels == k, masks[kind]
        assert (truth & got).sum() / (truth | got).sum() > 0.97, kind
    assert sum(m.astype(int) for m in masks.values()).max() == 1  # kinds do not overlap
    # ... and cover what was drawn: the non-glass pixels of the slide, in blocks of 4 x 4 px
    level0 = tifffile.imread(path)
    level1 = level0.reshape(500, 4, 500, 4, 3).mean(axis=(1, 3))
    drawn = np.abs(level1 - np.array(GLASS_RGB)).max(-1) > 5  # mucin's vacuoles are 8 off glass
    cover = np.zeros(drawn.shape, bool)
    for m in region_masks(regions, drawn.shape, 4.0).values():
        cover |= m
    assert (cover & ~drawn).mean() < 0.005
    # nothing is drawn outside the regions but nuclei overhanging their edge by a few um
    near = cv2.dilate(cover.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert (drawn & ~cover).mean() < 0.02 and (drawn & ~near).mean() < 0.001
    # each region's pixels look like its kind (away from the borders)
    for kind, m in region_masks(regions, drawn.shape, 4.0).items():
        core = cv2.erode(m.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        mean = level1[core].astype(float).mean(0)
        assert np.abs(mean - kind_stats(painted(kind, mpp=1.0))[:3]).max() < 10, kind


def test_kinds_are_large_and_unequal(slide) -> None:
    _, layout, _ = slide
    shares = layout.shares()
    assert min(shares.values()) >= 0.5 / 3 and abs(sum(shares.values()) - 1) < 1e-9
    assert max(shares.values()) - min(shares.values()) > 0.02


def test_every_template_splits_into_exactly_its_sentence() -> None:
    rng = np.random.default_rng(0)
    kinds = sorted(KINDS)
    for kind in kinds:
        for text in TEMPLATES[kind]:
            assert kind[:4].lower() in text.lower().replace("tumor", "tumour") or kind == "lymphocytes" and "lymph" in text.lower(), text
            others = [k for k in kinds if k != kind][:2]
            for order in ([kind, *others], [*others, kind]):
                caption, sentences = planted_caption(order, rng)
                # force this template in its slot
                i = order.index(kind)
                texts = [s.text for s in sentences]
                texts[i] = text
                caption = " ".join(texts)
                pieces = split_caption(caption)
                assert [p.text for p in pieces] == texts, caption
    # a drawn caption's sentence spans are what the splitter gives; wording varies per kind
    seen: dict[str, set[str]] = {k: set() for k in kinds}
    for _ in range(60):
        order = list(rng.choice(kinds, 3, replace=False))
        caption, sentences = planted_caption(order, rng)
        check_split(caption, sentences)
        assert [s.kind for s in sentences] == order
        for s in sentences:
            assert caption[s.start:s.end] == s.text
            seen[s.kind].add(s.text)
    assert all(len(v) >= 2 for v in seen.values()), seen


def test_patch_truth_on_a_hand_made_grid() -> None:
    regions = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"kind": "a"}, "geometry": {"type": "Polygon", "coordinates": [
            [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]}},
        {"type": "Feature", "properties": {"kind": "b"}, "geometry": {"type": "Polygon", "coordinates": [
            [[100, 0], [200, 0], [200, 100], [100, 100], [100, 0]]]}},
        {"type": "Feature", "properties": {"kind": "a"}, "geometry": {"type": "Polygon", "coordinates": [
            [[0, 200], [100, 200], [100, 300], [0, 300], [0, 200]],
            [[25, 225], [75, 225], [75, 275], [25, 275], [25, 225]]]}},  # a ring: square with a hole
    ]}
    boxes = pd.DataFrame({"x": [0, 60, 150, 0, 78, 25, 0], "y": [0, 0, 0, 150, 75, 225, 200],
                          "size": [50, 50, 50, 50, 50, 50, 100]})
    got = patch_truth(boxes, regions, downsample=1.0)
    assert list(got["kind"]) == ["a", "a", "b", BACKGROUND, BACKGROUND, BACKGROUND, "a"]
    # box 4: a 22 x 25, b 28 x 25 of 50 x 50 px; box 5: the hole (its edge cells count as a);
    # box 6: a square with a 50 px hole, 3/4 of it a
    assert got["fraction_a"].tolist() == pytest.approx([1.0, 0.8, 0.0, 0.0, 0.22, 0.0, 0.75], abs=0.045)
    assert got["fraction_b"].tolist() == pytest.approx([0.0, 0.2, 1.0, 0.0, 0.28, 0.0, 0.0], abs=0.03)
    assert got["fraction"].tolist() == pytest.approx([1.0, 0.8, 1.0, 1.0, 0.5, 1.0, 0.75], abs=0.045)
    assert list(patch_truth(boxes, regions, downsample=5.0)["kind"]) == list(got["kind"])  # coarser cells
    # the same from a feature file's coords (level-0 top-left) and one size, or an (N, 3) array
    same = patch_truth(boxes[["x", "y"]].to_numpy()[:6], regions, size=50, downsample=1.0)
    pd.testing.assert_frame_equal(same, got.iloc[:6])
    pd.testing.assert_frame_equal(patch_truth(boxes.to_numpy(), regions, downsample=1.0), got)
    assert len(patch_truth(np.zeros((0, 3)), regions)) == 0


def test_localisation_metrics_against_hand_computed_values() -> None:
    inside = [True, True, False, False, False]
    assert localization_auroc([5, 4, 3, 2, 1], inside) == 1.0
    assert localization_auroc([1, 2, 3, 4, 5], inside) == 0.0
    assert localization_auroc([1, 1, 1, 1, 1], inside) == 0.5
    # pairs (inside, outside): (0.9, 0.1) (0.9, 0.5) (0.4, 0.1) won, (0.4, 0.5) lost
    assert localization_auroc([0.9, 0.1, 0.5, 0.4], [True, False, False, True]) == 0.75
    assert np.isnan(localization_auroc([1, 2], [True, True]))
    assert pointing_hit([0.9, 0.1, 0.5], [True, False, False])
    assert not pointing_hit([0.1, 0.9, 0.5], [True, False, False])
    assert not pointing_hit([1, 1, 0], [True, False, False])  # a tie at the top counts against
    assert pointing_hit([1, 1, 1], [True, True, True])
    m = localization_metrics([([5, 4, 3, 2, 1], inside), ([1, 2, 3, 4, 5], inside), ([1, 2], [True, True])])
    assert m["n"] == 3 and m["n_auroc"] == 2 and m["auroc"] == 0.5 and m["auroc_chance"] == 0.5
    assert m["pointing"] == pytest.approx(2 / 3) and m["pointing_chance"] == pytest.approx((0.4 + 0.4 + 1) / 3)


def test_caption_slide_retrieval_and_its_chance_levels() -> None:
    sim = np.array([[0.9, 0.1, 0.2],  # caption 0: its slide first
                    [0.8, 0.3, 0.1],  # caption 1: its slide second
                    [0.5, 0.6, 0.2]])  # caption 2: its slide third
    r = caption_slide_retrieval(sim, ks=(1, 2, 3))
    assert (r["R@1"], r["R@2"], r["R@3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert (r["R@1_chance"], r["R@2_chance"], r["R@3_chance"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert r["n"] == 3 and r["gallery"] == 3
    assert retrieval_chance(np.eye(10, dtype=bool), 1) == pytest.approx(0.1)
    assert retrieval_chance(np.eye(10, dtype=bool), 5) == pytest.approx(0.5)
    two = np.array([[True, True, False, False]])  # two correct of four, top 1: 1 - C(2,1)/C(4,1)
    assert retrieval_chance(two, 1) == pytest.approx(0.5)
    assert caption_slide_retrieval(np.ones((4, 4)), ks=(1,))["R@1"] == 0.0  # ties against the query


def test_cohort_files_and_their_truth(tmp_path) -> None:
    out = tmp_path / "cohort"
    assert main(["planted-cohort", "--out", str(out), "--slides", "3", "--seed", "7", "--size-mm", "1.5",
                 "--mpp", "1.0"]) == 0
    files = CohortFiles(out)
    table = read_slide_table(files.table)
    truth = pd.read_parquet(files.truth)
    assert list(table.index) == ["planted_000", "planted_001", "planted_002"]
    assert set(table["caption_source"]) == {"generated"} and (table["mpp"] == 1.0).all()
    for sid, row in table.iterrows():
        assert Path(row["path"]).exists()
        regions = read_regions(out / row["regions"])
        kinds = row["kinds"].split(",")
        assert {f["properties"]["kind"] for f in regions["features"]} == set(kinds)
        rows = truth[truth["slide_id"] == sid].sort_values("sentence")
        assert list(rows["kind"]) == kinds and 2 <= len(kinds) <= 3
        assert list(rows["tissue_share"]) == sorted(rows["tissue_share"], reverse=True)  # largest first
        # the project's sub-captions of this caption are exactly the truth's sentences, same ids
        sub = subcaption_table(sid, row["caption"])
        assert list(sub["subcaption_id"]) == list(rows["subcaption_id"])
        assert list(zip(sub["start"], sub["end"], sub["text"])) == list(zip(rows["start"], rows["end"], rows["text"]))
    # the config is the repository's with the cohort's table, and the workflow's schema accepts it
    config = yaml.safe_load(files.config.read_text())
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    assert config["slides"] == "slides.tsv" and config["demo"] == [] and config["ablations"] == {}
    assert config["tiling"]["selection"] == "all" and config["tiling"]["patch_px"] == base["tiling"]["patch_px"]
    assert config["captions"] == base["captions"] and config["pretrain"]["model"] == base["pretrain"]["model"]
    jsonschema.validate(config, load_schema())
    # the same arguments write the same cohort
    again = tmp_path / "again"
    write_planted_cohort(again, 3, 7, size_mm=1.5, mpp=1.0)
    pd.testing.assert_frame_equal(pd.read_parquet(CohortFiles(again).truth), truth)
    assert CohortFiles(again).slide("planted_001").read_bytes() == files.slide("planted_001").read_bytes()
    assert CohortFiles(again).regions("planted_001").read_text() == files.regions("planted_001").read_text()


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-centroid accuracy (Euclidean, on z-scored features)."""
    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    classes = sorted(set(labels))
    sums = {c: x[labels == c].sum(0) for c in classes}
    counts = {c: int((labels == c).sum()) for c in classes}
    right = 0
    for xi, li in zip(x, labels):
        cents = [(sums[c] - (xi if c == li else 0)) / (counts[c] - (c == li)) for c in classes]
        right += classes[int(np.argmin([np.linalg.norm(xi - c) for c in cents]))] == li
    return right / len(labels)


@pytest.mark.slow
def test_a_planted_cohort_through_tiles_and_features(tmp_path) -> None:
    """`mrplip planted-cohort` then `snakemake tiles` and the demo encoder's image features on
    4 slides of 3.1 mm at 0.5 um/px (about 2-3 minutes on two busy cores)."""
    wd = tmp_path / "cohort"
    t0 = time.perf_counter()
    assert main(["planted-cohort", "--out", str(wd), "--slides", "4", "--seed", "0", "--size-mm", "3.1"]) == 0
    t1 = time.perf_counter()
    config = yaml.safe_load(CohortFiles(wd).config.read_text())
    table = read_slide_table(CohortFiles(wd).table)
    layout = Layout()
    encoder = config["features"]["image_encoder"]
    targets = ["tiles", *layout.expand("image_features", encoder=encoder, slide=list(table.index))]
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d",
                           str(wd), "--cores", "2", *targets], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    t2 = time.perf_counter()
    print(f"\nplanted cohort of {len(table)} slides: generation {t1 - t0:.1f} s, tiles + features {t2 - t1:.1f} s")
    res = Layout(wd / "results")
    feats, kinds = [], []
    for sid in table.index:
        regions = read_regions(wd / table.at[sid, "regions"])
        with h5py.File(res.image_features(encoder, sid), "r") as f:
            assert f.attrs["status"] == "ok"
            group = f["20x"]
            truth = patch_truth(group["coords"][:], regions, size=int(group.attrs["size"]))
            pure = (truth["fraction"] >= 0.9).to_numpy() & (truth["kind"] != BACKGROUND).to_numpy()
            feats.append(group["features"][:].astype(np.float32)[pure])
            kinds += [str(k) for k in truth["kind"][pure]]
        # every kind of the slide gets patches (at 20x, 256 um: most of them pure)
        assert set(truth["kind"][pure]) == set(table.at[sid, "kinds"].split(",")), sid
    labels = np.asarray(kinds)
    acc = nearest_centroid_accuracy(np.concatenate(feats), labels)
    print(f"{len(labels)} pure 20x patches of {sorted(set(labels))}: nearest-centroid accuracy {acc:.3f}")
    assert acc > 0.9
