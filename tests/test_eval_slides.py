"""Slide-level evaluation (`mrplip evaluate-slides`) of a PathFLIP run on the planted feature
corpus: zero-shot and probe rows for a label column, caption <-> slide retrieval on the held-out
slides, and n/a with the reason where a number cannot be computed."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from mrplip_core.evaluation.run import write_summary
from mrplip_core.evaluation.settings import EvaluationSettings
from mrplip_core.encoders.catalog import DEFAULT_IMAGE_ENCODER
from mrplip_core.evaluation.slides import evaluate_slides, slide_summary_rows
from mrplip_core.layout import Layout
from mrplip_core.testing.pathflip_corpus import KINDS, TRUTH_FILE, tiny_pathflip_settings, write_pathflip_corpus
from mrplip_core.train.pathflip import train_pathflip
from mrplip_core.train.pathflip_config import PathflipTrainConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides_eval")
    results = write_pathflip_corpus(root / "results", n_slides=16)
    settings = tiny_pathflip_settings(results, train={"steps": 150})
    settings["run"] = "planted"
    train_pathflip(PathflipTrainConfig.from_dict(settings), Layout(results).pathflip_dir("planted"))
    captions = pd.read_parquet(Layout(results).slide_captions)
    tumour = ["present" if any(s in c for s in KINDS["tumour"]) else "absent" for c in captions["caption"]]
    table = pd.DataFrame({"slide_id": captions["slide_id"], "path": [f"{s}.svs" for s in captions["slide_id"]],
                          "tumour": tumour, "site": "one"})
    table.to_csv(root / "slides.tsv", sep="\t", index=False)
    prompts = {"templates": ["{name}."], "classes": {"present": list(KINDS["tumour"]),
                                                     "absent": ["Fibrous stroma with sparse spindle cells is seen."]}}
    (root / "tumour.json").write_text(json.dumps(prompts))
    return root, results


def test_slide_level_rows_with_protocols_and_reasons(trained):
    root, results = trained
    split = pd.read_parquet(Layout(results).pathflip_slides("planted"))
    held_out = split.loc[split["split"] == "val", "slide_id"].tolist()
    settings = EvaluationSettings.from_dict({"slides": {"labels": {"tumour": str(root / "tumour.json"), "site": None,
                                                                   "grade": None}},
                                             "linear_probe": {"protocol": "kfold"}})
    metrics = evaluate_slides("pathflip-planted", results, root / "slides.tsv", settings, held_out)
    tumour = metrics["labels"]["tumour"]
    assert tumour["zero_shot"]["status"] == "ok" and tumour["linear_probe"]["status"] == "ok"
    for task in ("zero_shot", "linear_probe"):
        assert 0 <= tumour[task]["weighted_f1"] <= 1 and tumour[task]["n"] == 16
    assert tumour["zero_shot"]["macro_auc"] is not None
    assert "PathFLIP slide embedding" in tumour["zero_shot"]["protocol_note"]
    assert "1 class" in metrics["labels"]["site"]["zero_shot"]["reason"]
    assert "no column 'grade'" in metrics["labels"]["grade"]["linear_probe"]["reason"]
    r = metrics["retrieval"]
    assert r["status"] == "ok" and r["split"] == "held-out" and r["n_slides"] == len(held_out) >= 2
    assert r["chance"]["R@1"] == pytest.approx(1 / len(held_out))
    print("held-out caption->slide", r["caption_to_slide"], "chance", r["chance"])
    (root / "metrics.json").write_text(json.dumps(metrics, default=float))
    summary = write_summary([root / "metrics.json"], root / "summary.csv")
    assert set(summary["task"]) >= {"slide zero_shot tumour", "slide linear_probe tumour", "slide zero_shot site",
                                    "slide retrieval caption_to_slide R@1"}
    na = summary[summary["status"] == "n/a"]
    assert len(na) == 4 and na["note"].str.len().gt(10).all()
    assert np.isfinite(summary.loc[summary["task"] == "slide zero_shot tumour", "macro_auc"]).all()


def test_a_prompt_file_missing_a_label_costs_only_zero_shot(trained):
    root, results = trained
    (root / "bad.json").write_text(json.dumps({"templates": ["{name}."], "classes": {"present": ["tumour"]}}))
    settings = EvaluationSettings.from_dict({"slides": {"labels": {"tumour": str(root / "bad.json")}}})
    tumour = evaluate_slides("pathflip-planted", results, root / "slides.tsv", settings)["labels"]["tumour"]
    assert tumour["zero_shot"]["status"] == "error" and "['absent']" in tumour["zero_shot"]["reason"]
    assert tumour["linear_probe"]["status"] == "ok"


def _qupath_regions(results, slide: str) -> dict:
    """The slide's planted regions as QuPath would export annotations: one MultiPolygon of patch
    squares per kind (level-0 px), the kind as the annotation's classification."""
    truth = pd.read_parquet(results / TRUTH_FILE)
    truth = truth[truth["slide_id"] == slide]
    with h5py.File(Layout(results).image_features(DEFAULT_IMAGE_ENCODER, slide), "r") as f:
        coords, size = f["20x"]["coords"][()], int(f["20x"].attrs["size"])
    features = []
    for kind in truth["kind"].unique():
        squares = [[[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]]
                   for (x, y), k in zip(coords.tolist(), truth["kind"]) if k == kind]
        features.append({"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": squares},
                         "properties": {"objectType": "annotation", "classification": {"name": kind}}})
    return {"type": "FeatureCollection", "features": features}


def test_localisation_from_a_geojson_column_of_the_slide_table(trained):
    root, results = trained
    table = pd.read_csv(root / "slides.tsv", sep="\t")
    (root / "regions").mkdir(exist_ok=True)
    for slide in table["slide_id"]:
        (root / "regions" / f"{slide}.geojson").write_text(json.dumps(_qupath_regions(results, slide)))
    table["annotation"] = [f"regions/{s}.geojson" for s in table["slide_id"]]
    table.loc[0, "annotation"] = "regions/missing.geojson"  # a slide whose file is not there
    table.loc[1, "annotation"] = None  # a slide without annotations
    table.to_csv(root / "annotated.tsv", sep="\t", index=False)
    prompts = {"templates": ["{name}"], "classes": {k: list(v) for k, v in KINDS.items()}}
    (root / "kinds.json").write_text(json.dumps(prompts))
    slides = {"labels": {}, "regions": "annotation", "region_prompts": str(root / "kinds.json")}
    loc = evaluate_slides("pathflip-planted", results, root / "annotated.tsv",
                          EvaluationSettings.from_dict({"slides": slides}))["localisation"]
    assert loc["status"] == "ok" and loc["n_slides"] == 14
    assert list(loc["failed"]) == [table.loc[0, "slide_id"]] and "missing.geojson" in loc["failed"][table.loc[0, "slide_id"]]
    print("localisation from QuPath annotations:", {k: loc[k] for k in ("auroc", "pointing", "pointing_chance", "n")})
    assert loc["auroc"] > 0.75 and loc["pointing"] > loc["pointing_chance"] + 0.2
    by_name = evaluate_slides("pathflip-planted", results, root / "annotated.tsv",  # the kind's name as the query
                              EvaluationSettings.from_dict({"slides": {"labels": {}, "regions": "annotation"}}))
    assert by_name["localisation"]["status"] == "ok" and "its name" in by_name["localisation"]["protocol_note"]
    rows = pd.DataFrame(slide_summary_rows(by_name))
    row = rows[rows["task"] == "slide localisation"].iloc[0]
    assert 0 <= row["auroc"] <= 1 and "missing.geojson" in row["note"] and "pointing" in row["protocol"]
    none = evaluate_slides("pathflip-planted", results, root / "slides.tsv",
                           EvaluationSettings.from_dict({"slides": {"labels": {}, "regions": "annotation"}}))
    assert none["localisation"]["status"] == "n/a" and "no column 'annotation'" in none["localisation"]["reason"]
