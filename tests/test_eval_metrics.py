"""Evaluation building blocks checked against independent computations: metrics, recall@K,
prompt files, settings and the workflow plan. No model is loaded here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

from mrplip_core.evaluation.metrics import classification_metrics, mean_std, recall_at_k
from mrplip_core.evaluation.plan import EvaluationPlan
from mrplip_core.layout import Layout
from mrplip_core.evaluation.probe import choose_protocol, few_shot, linear_probe
from mrplip_core.evaluation.prompts import PromptError, PromptSet
from mrplip_core.evaluation.retrieval import retrieval_scores
from mrplip_core.evaluation.settings import EvaluationSettings, FewShotSettings, LinearProbeSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # the reference call below
def test_classification_metrics_equal_sklearn_and_list_every_class() -> None:
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    y = rng.integers(0, 3, 50)  # class "d" never occurs in the truth
    p = np.where(rng.random(50) < 0.6, y, rng.integers(0, 4, 50))
    m = classification_metrics(y, p, classes)
    assert m["weighted_f1"] == pytest.approx(f1_score(y, p, average="weighted", labels=[0, 1, 2, 3], zero_division=0))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["accuracy"] == pytest.approx(np.mean(y == p))
    assert m["confusion"] == confusion_matrix(y, p, labels=[0, 1, 2, 3]).tolist()
    assert [r["class"] for r in m["per_class"]] == classes and m["per_class"][3]["support"] == 0
    assert sum(r["support"] for r in m["per_class"]) == m["n"] == 50


def brute_force_recall(sim: np.ndarray, correct: np.ndarray, k: int) -> float:
    """Per query: sort the gallery by similarity, wrong items first among ties."""
    hits = []
    for i in range(len(sim)):
        order = sorted(range(sim.shape[1]), key=lambda j: (-sim[i, j], bool(correct[i, j])))
        hits.append(any(correct[i, j] for j in order[:k]))
    return float(np.mean(hits))


def test_recall_at_k_matches_a_brute_force_ranking_with_ties_and_duplicates() -> None:
    rng = np.random.default_rng(1)
    sim = rng.integers(0, 5, (30, 30)).astype(float)  # many ties
    captions = rng.integers(0, 20, 30)
    correct = captions[:, None] == captions[None, :]
    got = recall_at_k(sim, (1, 3, 5), correct)
    for k in (1, 3, 5):
        assert got[f"R@{k}"] == pytest.approx(brute_force_recall(sim, correct, k))
    assert recall_at_k(np.eye(6), (1,))["R@1"] == 1.0
    assert recall_at_k(np.ones((6, 6)), (1, 5))["R@5"] == 0.0  # a constant embedding never scores


def test_retrieval_scores_perfect_pairs_and_shuffled_pairs() -> None:
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((200, 16))
    captions = [f"caption {i}" for i in range(200)]
    good = retrieval_scores(emb, emb + 0.01 * rng.standard_normal(emb.shape), captions, (1, 10))
    assert good["image_to_text"]["R@1"] == 1.0 and good["text_to_image"]["R@1"] == 1.0
    bad = retrieval_scores(emb, rng.permutation(emb), captions, (1, 10))
    assert bad["image_to_text"]["R@10"] < 0.15 and bad["chance"]["R@10"] == pytest.approx(0.05)


def test_prompt_files_of_the_repository_cover_their_datasets(shared_data: Path) -> None:
    import pandas as pd

    for name, folder in (("nct_crc", "nct_crc_he_100k_samples"), ("kather2016", "kather2016_samples")):
        prompts = PromptSet.read(REPO / "evaluation" / "prompts" / f"{name}.json")
        labels = pd.read_csv(shared_data / "tiles" / folder / "labels.csv")["label"].unique().tolist()
        prompts.check_labels(labels)
        for label in labels:
            texts = prompts.prompts(label)
            assert len(texts) == len(prompts.templates) * len(prompts.classes[label]) >= 10
            assert all("{name}" not in t for t in texts)


def test_prompt_file_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"templates": ["no placeholder"], "classes": {"a": ["x"]}}))
    with pytest.raises(PromptError, match="without"):
        PromptSet.read(bad)
    ok = PromptSet.from_dict({"templates": ["{name}."], "classes": {"a": ["x"], "b": "y"}})
    with pytest.raises(PromptError, match=r"no prompts for the label\(s\) \[.c.\]"):
        ok.check_labels(["a", "b", "c"])


def test_settings_reject_unknown_keys_and_bad_datasets() -> None:
    with pytest.raises(ValueError, match=r"evaluation.linear_probe.*\['fold'\]"):
        EvaluationSettings.from_dict({"linear_probe": {"fold": 3}})
    with pytest.raises(ValueError, match="mpp"):
        EvaluationSettings.from_dict({"datasets": {"x": {"path": "a.csv", "mpp": 0}}})
    with pytest.raises(ValueError, match="not a usable name"):
        EvaluationSettings.from_dict({"datasets": {"retrieval": {"path": "a.csv", "mpp": 0.5}}})
    s = EvaluationSettings.from_dict({"datasets": {"x": {"path": "a.csv", "mpp": 0.25}}, "few_shot": {"shots": [1, 2]}})
    assert s.dataset("x").model_magnification == 40.0 and s.few_shot.shots == (1, 2)
    assert EvaluationSettings.from_dict(s.to_dict()) == s


def test_protocol_choice_is_honest_about_tiny_sets() -> None:
    lp = LinearProbeSettings()
    assert choose_protocol(np.repeat(np.arange(9), 1), None, lp)[0] == "n/a"
    protocol, folds, reason = choose_protocol(np.repeat(np.arange(8), 3), None, lp)
    assert (protocol, folds) == ("kfold", 3) and "smallest class has 3" in reason
    assert choose_protocol(np.repeat(np.arange(3), 40), None, lp)[0] == "holdout"
    assert choose_protocol(np.repeat(np.arange(3), 4), ["train", "test"] * 6, lp)[0] == "given"
    with pytest.raises(ValueError, match="no split column"):
        choose_protocol(np.repeat(np.arange(3), 4), None, LinearProbeSettings(protocol="given"))


def test_linear_probe_never_sees_test_tiles_when_choosing_c() -> None:
    """With the given split, the test tiles' labels are noise: a probe that peeked would fit them."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((80, 5))
    y = (x[:, 0] > 0).astype(int)
    split = np.array(["train"] * 40 + ["test"] * 40)
    y_noisy = y.copy()
    y_noisy[40:] = rng.integers(0, 2, 40)
    r = linear_probe(x, y_noisy, ["neg", "pos"], split, LinearProbeSettings(c_grid=(0.01, 1.0, 100.0)))
    assert r["protocol"] == "given" and r["n_test"] == 40 and r["n_train"] == 40
    expected = np.mean(y_noisy[40:] == y[40:])  # the probe learns the true rule; noise caps its score
    assert r["accuracy"] == pytest.approx(expected, abs=0.1)
    assert all(p == -1 for p in r["predictions"][:40])


def test_few_shot_reports_mean_and_spread_and_skips_impossible_k() -> None:
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 5)
    x = np.eye(3)[y] * 3 + 0.5 * rng.standard_normal((15, 3))
    r = few_shot(x, y, ["a", "b", "c"], None, FewShotSettings(shots=(1, 2, 8), seeds=(0, 1, 2)),
                 LinearProbeSettings(c_grid=(1.0,)))
    assert set(r["shots"]) == {"1", "2"} and "8" in r["skipped"]
    one = r["shots"]["1"]
    assert one["n_seeds"] == 3 and one["n_test"] == 12
    assert one["weighted_f1"] == mean_std([run["weighted_f1"] for run in one["runs"]])


def test_plan_lists_models_inputs_and_skips_absent_optional_datasets(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n")
    config = {
        "features": {"image_encoder": "uni"},
        "pretrain": {"run": "base"},
        "evaluation": {"runs": ["base", "no-mrtva"], "datasets": {
            "here": {"path": str(csv), "mpp": 0.5, "prompts": "p.json"},
            "gone": {"path": str(tmp_path / "nope.csv"), "mpp": 0.5, "optional": True}}},
    }
    plan = EvaluationPlan.from_config(config, ["s1", "s2"], run_encoders={"base": "uni", "no-mrtva": "uni"})
    assert plan.models == ["frozen-uni", "base", "no-mrtva"]
    assert len(plan.metrics_files()) == 3 * 2 + 2
    inputs = plan.dataset_inputs("no-mrtva", "here")
    assert inputs == {"tiles": str(csv), "features": "results/eval/features/uni/here.h5", "prompts": "p.json",
                      "model": "results/pretrain/no-mrtva/model.safetensors"}
    assert plan.dataset_inputs("frozen-uni", "gone") == {}
    assert plan.retrieval_inputs("base")["features"] == ["results/features/uni/s1.h5", "results/features/uni/s2.h5"]
    features = {"features": {"image_encoder": "uni"}}
    assert EvaluationPlan.from_config(features, run_encoders={"a": "uni", "b": "conch"}).runs == ["a", "b"]
    assert EvaluationPlan.from_config(features, run_encoders={"a": "uni", "b": "conch"}).encoder_of("b") == "conch"
    with pytest.raises(ValueError, match="reserved"):
        EvaluationPlan.from_config({**features, "evaluation": {"runs": ["frozen-x"]}})
    with pytest.raises(ValueError, match="'old' is not a pretraining run of this config"):
        EvaluationPlan.from_config({**features, "evaluation": {"runs": ["old"]}}, layout=Layout(tmp_path))
    # a run trained earlier: its encoder comes from the config it wrote
    (tmp_path / "pretrain" / "old").mkdir(parents=True)
    (tmp_path / "pretrain" / "old" / "config.yaml").write_text("pretrain:\n  data: {image_encoder: uni2-h}\n")
    old = EvaluationPlan.from_config({**features, "evaluation": {"runs": ["old"]}}, layout=Layout(tmp_path))
    assert old.encoder_of("old") == "uni2-h"


def test_slide_level_job_waits_for_the_region_files_its_table_names(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    table = tmp_path / "t" / "slides.tsv"
    table.write_text("slide_id\tpath\tregions\na\ta.svs\tann/a.geojson\nb\tb.svs\t\nc\tc.svs\t/abs/c.geojson\n")
    config = {"features": {"image_encoder": "uni"}, "slides": str(table),
              "evaluation": {"slides": {"regions": "regions", "region_prompts": "kinds.json"}}}
    plan = EvaluationPlan.from_config(config, ["a", "b", "c"], run_encoders={"base": "uni"}, pathflip_runs={"p": "uni"})
    inputs = plan.slide_eval_inputs("pathflip-p")
    assert inputs["regions"] == [str(tmp_path / "t" / "ann" / "a.geojson"), "/abs/c.geojson"]
    assert inputs["region_prompts"] == "kinds.json"
    config["evaluation"]["slides"] = {}
    assert EvaluationPlan.from_config(config, ["a"], pathflip_runs={"p": "uni"}).slide_eval_inputs("pathflip-p")["regions"] == []


def test_tiny_or_unsplit_sets_are_na_with_the_reason_not_a_crash() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(9), 2)
    x = rng.normal(size=(18, 4)) + y[:, None]
    classes = [str(i) for i in range(9)]
    held = linear_probe(x, y, classes, None, LinearProbeSettings(protocol="holdout"))
    assert held["status"] == "n/a" and "9 classes" in held["reason"]
    assert linear_probe(x, y, classes, None, LinearProbeSettings())["status"] == "ok"  # auto: k-fold
    no_test = few_shot(x, y, classes, ["train"] * 18, FewShotSettings(), LinearProbeSettings())
    assert no_test["status"] == "n/a" and "no test tiles" in no_test["reason"]


def test_a_section_that_is_not_a_mapping_is_named() -> None:
    with pytest.raises(ValueError, match=r"evaluation\.zero_shot: expected a mapping"):
        EvaluationSettings.from_dict({"zero_shot": True})


def test_report_shows_only_the_configured_models() -> None:
    from mrplip_core.report.evaluation import model_order

    metrics = [{"model": m} for m in ("frozen-old", "frozen-uni", "demo", "gone", "no-mrtva")]
    assert model_order(metrics, ["demo", "no-mrtva"], ["uni"]) == ["frozen-uni", "demo", "no-mrtva"]
    assert model_order(metrics) == ["frozen-old", "frozen-uni", "demo", "gone", "no-mrtva"]  # nothing configured: all
