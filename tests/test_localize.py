"""``mrplip localize`` on the feature-level planted corpus (mrplip_core.testing.pathflip_corpus):
a tiny PathFLIP trained here (~10 s) finds the planted region of each query's tissue kind on
held-out slides (IoU of the GeoJSON region with the planted patches, printed); the outputs are
valid (QuPath GeoJSON in level-0 px inside the slide, a Parquet row per patch, a heatmap PNG on a
blank canvas since the corpus has no slide files); the MR-PLIP baseline runs through the same
verb; bad inputs are named, and in a batch recorded while the other slides are done."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mrplip_core.cli import main  # noqa: E402
from mrplip_core.encoders.catalog import DEFAULT_IMAGE_ENCODER  # noqa: E402
from mrplip_core.layout import Layout  # noqa: E402
from mrplip_core.testing.known_answers import write_untrained_run  # noqa: E402
from mrplip_core.testing.pathflip_corpus import KINDS, TRUTH_FILE, tiny_pathflip_settings, write_pathflip_corpus  # noqa: E402
from mrplip_core.train.pathflip import train_pathflip  # noqa: E402
from mrplip_core.train.pathflip_config import PathflipTrainConfig  # noqa: E402
from mrplip_core.use.localize import query_key  # noqa: E402

GRID, PATCH_PX = 8, 512  # the corpus: an 8 x 8 grid of 512 level-0 px patches per slide
TOP_FRACTION = 0.25
QUERIES = {kind: sentences[0] for kind, sentences in KINDS.items()}  # one sentence per kind


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("localize")
    results = write_pathflip_corpus(root / "results", n_slides=16, grid=GRID, patch_px=PATCH_PX)
    layout = Layout(results)
    slides = sorted(p.stem for p in layout.image_features_dir(DEFAULT_IMAGE_ENCODER).glob("*.h5"))
    # a slide table as the tiles stage writes it (no slide files: the heatmap falls back to a canvas),
    # listing one slide more, whose features were never made
    pd.DataFrame({"slide_id": slides + ["no_features"], "path": [str(root / f"{s}.tiff") for s in slides + ["nf"]],
                  "mpp": 0.5, "status": "ok"}).to_parquet(layout.slides_table)
    run_dir = layout.pathflip_dir("tiny")
    train_pathflip(PathflipTrainConfig.from_dict(tiny_pathflip_settings(results, train={"steps": 200})), run_dir)
    split = pd.read_parquet(layout.pathflip_slides("tiny"))
    held_out = sorted(split.loc[split["split"] == "val", "slide_id"].astype(str))
    assert held_out, split
    return {"results": results, "run_dir": run_dir, "held_out": held_out, "slides": slides}


def localize(trained: dict, slides: list[str], texts: list[str], *extra: str, model: str | None = None) -> int:
    argv = ["localize", "--model", model or str(trained["run_dir"]), "--results", str(trained["results"]),
            "--top-fraction", str(TOP_FRACTION), *extra]
    for s in slides:
        argv += ["--slide", s]
    for t in texts:
        argv += ["--text", t]
    return main(argv)


def test_the_top_region_overlaps_the_planted_region_of_the_query(trained, capsys) -> None:
    results, held_out = trained["results"], trained["held_out"]
    assert localize(trained, held_out, list(QUERIES.values())) == 0
    truth = pd.read_parquet(results / TRUTH_FILE)
    summary = pd.read_parquet(Layout(results).localize_summary("pathflip-tiny"))
    assert (summary["status"] == "ok").all() and len(summary) == len(held_out) * len(QUERIES)
    assert set(summary["background"]) == {"blank canvas (no slide image)"}
    ious = []
    for row in summary.itertuples():
        kind = next(k for k, q in QUERIES.items() if q == row.query)
        planted = set(truth.loc[(truth["slide_id"] == row.slide_id) & (truth["kind"] == kind), "patch_id"])
        if not planted:  # the kind is not on this slide
            continue
        scores = pd.read_parquet(row.scores)
        region = set(scores.loc[scores["in_region"], "patch_id"])
        ious.append(len(region & planted) / len(region | planted))
    iou = float(np.mean(ious))
    with capsys.disabled():
        print(f"\nheld-out slides {len(held_out)}, queries of kinds present {len(ious)}: mean IoU {iou:.3f} "
              f"(top {TOP_FRACTION:.0%} of patches vs the planted region), min {min(ious):.2f}")
    assert iou > 0.3


def test_outputs_are_a_row_per_patch_qupath_geojson_in_level0_px_and_a_png(trained) -> None:
    results, slide = trained["results"], trained["held_out"][0]
    text = QUERIES["stroma"]
    assert localize(trained, [slide], [text]) == 0
    layout = Layout(results)
    key = query_key(text)
    scores = pd.read_parquet(layout.localize_scores("pathflip-tiny", slide, key))
    assert len(scores) == GRID * GRID and scores["patch_id"].is_unique
    assert list(scores.columns[:7]) == ["slide_id", "patch_id", "x", "y", "w", "h", "magnification"]
    assert scores["score"].sum() == pytest.approx(1.0, abs=1e-4)  # PathFLIP's heatmap sums to 1 over the slide
    assert (scores["w"] == PATCH_PX).all() and scores["in_region"].sum() == int(np.ceil(TOP_FRACTION * GRID * GRID))
    collection = json.loads(layout.localize_geojson("pathflip-tiny", slide, key).read_text())
    assert collection["type"] == "FeatureCollection" and collection["properties"]["coordinates"] == "level-0 px"
    assert len(collection["features"]) == scores["in_region"].sum()
    extent = GRID * PATCH_PX
    for feature in collection["features"]:
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["name"] == text
        assert props["classification"]["name"] == text and len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {"score", "rank", "magnification"}
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all() and len(ring) == 5
        assert ring.min() >= 0 and ring.max() <= extent
    ranked = scores[scores["in_region"]].sort_values("rank")
    assert [f["properties"]["patch_id"] for f in collection["features"]] == list(ranked["patch_id"])
    png = Image.open(layout.localize_heatmap("pathflip-tiny", slide, key))
    assert png.mode == "RGB" and png.width >= 256


def test_shapely_reads_every_geometry_inside_the_slide(trained) -> None:
    shapely_geometry = pytest.importorskip("shapely.geometry", reason="shapely: pip install -e '.[dev]'")
    results, slide = trained["results"], trained["held_out"][0]
    assert localize(trained, [slide], [QUERIES["tumour"]], "--out", str(results / "shapely")) == 0
    collection = json.loads((results / "shapely" / slide / f"{query_key(QUERIES['tumour'])}.geojson").read_text())
    box = shapely_geometry.box(0, 0, GRID * PATCH_PX, GRID * PATCH_PX)
    for feature in collection["features"]:
        geometry = shapely_geometry.shape(feature["geometry"])
        assert geometry.is_valid and geometry.area == PATCH_PX * PATCH_PX and box.contains(geometry)


def test_the_mrplip_baseline_runs_through_the_same_verb(trained) -> None:
    results, slide = trained["results"], trained["held_out"][0]
    run = write_untrained_run(Layout(results).run_dir("base"), image_dim=32, magnifications=(20.0,))
    assert localize(trained, [slide], [QUERIES["mucin"]], model=str(run)) == 0
    scores = pd.read_parquet(Layout(results).localize_scores("mrplip-base", slide, query_key(QUERIES["mucin"])))
    assert len(scores) == GRID * GRID and scores["score"].between(-1.0, 1.0).all()  # patch-text cosines
    assert scores["score"].std() > 0


def test_bad_inputs_are_named_and_a_batch_records_them_and_does_the_rest(trained, capsys) -> None:
    results = trained["results"]
    good = trained["held_out"][0]
    assert localize(trained, [good], [""]) == 2
    assert "text query 1 of 1 is empty" in capsys.readouterr().err
    assert localize(trained, [good], ["stroma"], model=str(results / "nowhere")) == 2
    assert "holds no model.json" in capsys.readouterr().err
    out = results / "batch"
    assert localize(trained, ["nope", good, "no_features"], ["stroma"], "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "'nope': unknown slide id" in err and "'no_features': no features" in err
    summary = pd.read_parquet(out / "summary.parquet").set_index("slide_id")
    assert summary.loc[good, "status"] == "ok" and Path(summary.loc[good, "geojson"]).exists()
    assert summary.loc["nope", "status"] == "failed" and "not in" in summary.loc["nope", "error"]
    assert "features" in summary.loc["no_features", "error"]
    assert localize(trained, ["nope", good], ["stroma"], "--out", str(out), "--keep-going") == 0
