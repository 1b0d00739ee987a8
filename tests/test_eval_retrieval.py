"""Retrieval with a really trained MR-PLIP: a tiny run pretrained by the trainer on a synthetic
corpus (features and captions in the artifact formats, captions that describe what the features
encode), evaluated on the slides the run held out. Trained, the model must retrieve far above
chance; and the retrieval must only ever use held-out slides unless told otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mrplip_core.data.index import slide_split
from mrplip_core.testing.synthetic_corpus import tiny_pretrain_settings, write_synthetic_corpus, write_synthetic_tokenizer
from mrplip_core.cli import main
from mrplip_core.evaluation.retrieval import held_out_slides, retrieval_pairs
from mrplip_core.evaluation.run import run_retrieval
from mrplip_core.evaluation.settings import EvaluationSettings, RetrievalSettings
from mrplip_core.train import PretrainConfig, pretrain

SLIDES = (("synth_a", 40.0), ("synth_b", 20.0), ("synth_c", 40.0))
VAL_FRACTION = 0.3  # with split seed 0 this holds out synth_b and synth_c


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("retrieval")
    results = write_synthetic_corpus(root / "results", slides=SLIDES, bags_per_slide=4, failed_slide=False)
    tokenizer = write_synthetic_tokenizer(root / "tokenizer")
    settings = tiny_pretrain_settings(results, tokenizer, run="tiny", data={"val_fraction": VAL_FRACTION},
                                      train={"steps": 60}, optim={"lr": 1e-2})
    pretrain(PretrainConfig.from_dict(settings), results / "pretrain" / "tiny")
    return results


def test_held_out_slides_are_the_runs_validation_split(trained: Path) -> None:
    expected = sorted(s for s, _ in SLIDES if slide_split(s, VAL_FRACTION, 0) == "val")
    assert held_out_slides(trained / "pretrain" / "tiny") == expected == ["synth_b", "synth_c"]


def test_trained_model_retrieves_held_out_pairs_far_above_chance(trained: Path) -> None:
    settings = json.dumps({"evaluation": {"retrieval": {"split": "val", "max_pairs": 400, "ks": [1, 5]}}, "features": {}})
    out = trained / "eval" / "tiny" / "retrieval"
    assert main(["evaluate-retrieval", "--model", "tiny", "--results", str(trained), "--settings", settings,
                 "--threads", "1"]) == 0
    r = json.loads((out / "metrics.json").read_text())
    assert r["status"] == "ok" and r["slides"] == ["synth_b", "synth_c"] and r["n_pairs"] == 400
    assert r["image_source"].startswith("stored features")
    for direction in ("image_to_text", "text_to_image"):
        assert r[direction]["R@1"] > 0.8 > 3 * r["chance"]["R@1"]
    assert set(r["by_magnification"]) == {"5x", "10x", "20x", "40x"}


def test_pairs_come_only_from_the_requested_slides_and_are_capped(trained: Path) -> None:
    pairs = retrieval_pairs(trained, ["synth_b"], RetrievalSettings(max_pairs=30, magnifications=(10.0, 20.0)))
    assert len(pairs) == 30 and set(pairs["slide_id"]) == {"synth_b"}
    assert set(pairs["magnification"]) <= {10.0, 20.0}
    captions = pd.read_parquet(trained / "captions" / "synth_b.parquet").set_index("patch_id")["caption"]
    assert (pairs["caption"].to_numpy() == captions.loc[pairs["patch_id"]].to_numpy()).all()
    again = retrieval_pairs(trained, ["synth_b"], RetrievalSettings(max_pairs=30, magnifications=(10.0, 20.0)))
    pd.testing.assert_frame_equal(pairs, again)


class _TextOnly:
    name, has_text, image_encoder = "stub", True, None

    def describe(self) -> dict:
        return {"kind": "stub"}


def test_a_run_without_held_out_slides_is_na_not_a_training_set_score(tmp_path: Path) -> None:
    run = tmp_path / "pretrain" / "r"
    run.mkdir(parents=True)
    pd.DataFrame({"slide_id": ["s"], "bag_id": ["b"], "split": ["train"]}).to_parquet(run / "bag_index.parquet")
    settings = EvaluationSettings.from_dict({"retrieval": {"split": "val"}})
    r = run_retrieval(_TextOnly(), tmp_path, settings, tmp_path / "out", run)
    assert r["status"] == "n/a" and "held out no slides" in r["reason"]
    assert np.isfinite(r["seconds"])
