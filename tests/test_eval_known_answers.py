"""Known answers: tiles of solid colours, embedded by their mean colour.

The classes are separable, so a linear probe must be perfect; prompts that name each
class's colour map into the same space, so zero-shot must be exact; with shuffled labels
both must fall to chance (1/6 here). A pipeline that leaked test labels, mixed up class
indices or ignored the prompts would fail one of these.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mrplip_core.evaluation.datasets import TileDataset
from mrplip_core.evaluation.prompts import PromptSet
from mrplip_core.evaluation.run import evaluate_dataset
from mrplip_core.evaluation.settings import DatasetSpec, EvaluationSettings
from mrplip_core.testing.known_answers import MeanColourEmbedder, colour_prompts, write_colour_tiles

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
CHANCE = 1 / len(COLOURS)
SETTINGS = EvaluationSettings.from_dict({
    "linear_probe": {"c_grid": [0.1, 1.0, 10.0], "inner_folds": 3},
    "few_shot": {"shots": [1, 4], "seeds": [0, 1, 2]},
})


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> TileDataset:
    root = write_colour_tiles(tmp_path_factory.mktemp("colours"), COLOURS, per_class=30, px=16, noise=20.0)
    return TileDataset.load(DatasetSpec(name="colours", path=str(root / "labels.csv"), mpp=0.5))


def test_separable_classes_give_a_perfect_probe_and_exact_zero_shot(colours: TileDataset, tmp_path: Path) -> None:
    r = evaluate_dataset(MeanColourEmbedder(), colours, SETTINGS, tmp_path, prompts=PromptSet.from_dict(colour_prompts(COLOURS)))
    lp, zs = r["linear_probe"], r["zero_shot"]
    assert lp["protocol"] == "holdout" and lp["n_test"] == 54  # 30% of 30 tiles x 6 classes
    assert lp["weighted_f1"] == 1.0 and lp["balanced_accuracy"] == 1.0
    assert zs["accuracy"] == 1.0 and zs["n"] == 180
    assert r["few_shot"]["shots"]["4"]["weighted_f1"]["mean"] == 1.0
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert (predictions["zero_shot"] == predictions["label"]).all()
    assert (tmp_path / "confusion_zero_shot.png").stat().st_size > 1000


def test_shuffled_labels_fall_to_chance(colours: TileDataset, tmp_path: Path) -> None:
    labels = np.random.default_rng(0).permutation(np.asarray(colours.labels))
    shuffled = dataclasses.replace(colours, labels=tuple(labels))
    r = evaluate_dataset(MeanColourEmbedder(), shuffled, SETTINGS, tmp_path, prompts=PromptSet.from_dict(colour_prompts(COLOURS)))
    assert r["linear_probe"]["balanced_accuracy"] < CHANCE + 0.2
    assert r["zero_shot"]["balanced_accuracy"] < CHANCE + 0.12
    assert r["few_shot"]["shots"]["4"]["weighted_f1"]["mean"] < CHANCE + 0.2


def test_zero_shot_follows_the_prompts_not_the_label_order(colours: TileDataset, tmp_path: Path) -> None:
    """Prompts naming each class by the next class's colour: every tile goes to the wrong class."""
    rotated = {c: [COLOURS[(i + 1) % len(COLOURS)]] for i, c in enumerate(COLOURS)}
    prompts = PromptSet.from_dict({"templates": ["a {name} tile."], "classes": rotated})
    r = evaluate_dataset(MeanColourEmbedder(), colours, SETTINGS, tmp_path, prompts=prompts)
    assert r["zero_shot"]["accuracy"] == 0.0


def test_no_text_side_means_zero_shot_is_na_but_the_probe_runs(colours: TileDataset, tmp_path: Path) -> None:
    r = evaluate_dataset(MeanColourEmbedder(with_text=False), colours, SETTINGS, tmp_path,
                         prompts=PromptSet.from_dict(colour_prompts(COLOURS)))
    assert r["zero_shot"]["status"] == "n/a" and "no text side" in r["zero_shot"]["reason"]
    assert r["linear_probe"]["accuracy"] == 1.0
