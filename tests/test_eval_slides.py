"""Slide-level evaluation (`mrplip evaluate-slides`) of a PathFLIP run on the planted feature
corpus: zero-shot and probe rows for a label column, caption <-> slide retrieval on the held-out
slides, and n/a with the reason where a number cannot be computed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mrplip_core.evaluation.run import write_summary
from mrplip_core.evaluation.settings import EvaluationSettings
from mrplip_core.evaluation.slides import evaluate_slides
from mrplip_core.layout import Layout
from mrplip_core.testing.pathflip_corpus import KINDS, tiny_pathflip_settings, write_pathflip_corpus
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
