"""The evaluation stage end to end on the real labelled tiles (NCT-CRC-HE-100K samples, 9 classes x 1;
Kather 2016 samples, 8 classes x 3), through the ``mrplip`` verbs, with the two real embedders:

* ``frozen-tiny-vit-random``: the baseline (seeded random ViT; its features carry no pathology);
* ``untrained``: the MR-PLIP adapter over ``mrplip_core.model.load`` of an export with random
  weights (the loader API the trainer exports; an untrained model is what exists without a
  GPU run, so zero-shot numbers here are chance-level by construction).

The numbers are not the point; the checks are that every result file agrees with an
independent recomputation from the per-tile predictions, and that the honest n/a cases
(1 tile per class, no text side) are reported as such.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import balanced_accuracy_score, f1_score  # noqa: E402

from mrplip_core.cli import main  # noqa: E402
from mrplip_core.evaluation.datasets import TileDataset  # noqa: E402
from mrplip_core.evaluation.embedders import (  # noqa: E402
    FrozenImageEncoder,
    MRPLIPEmbedder,
    build_embedder,
    check_weights_match,
)
from mrplip_core.evaluation.settings import EvaluationSettings  # noqa: E402
from mrplip_core.evaluation.tile_features import read_tile_features  # noqa: E402
from mrplip_core.testing.known_answers import write_untrained_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = ("frozen-tiny-vit-random", "untrained")
DATASETS = ("nct_crc", "kather2016")


@pytest.fixture(scope="module")
def workspace(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    torch.set_num_threads(1)
    results = tmp_path_factory.mktemp("eval") / "results"
    write_untrained_run(results / "pretrain" / "untrained")
    tiles = shared_data / "tiles"
    evaluation = {
        "datasets": {
            "nct_crc": {"path": str(tiles / "nct_crc_he_100k_samples" / "labels.csv"), "mpp": 0.5,
                        "prompts": str(REPO / "evaluation" / "prompts" / "nct_crc.json")},
            "kather2016": {"path": str(tiles / "kather2016_samples" / "Images" / "Samples"), "mpp": 0.495,
                           "prompts": str(REPO / "evaluation" / "prompts" / "kather2016.json")},
        },
        "linear_probe": {"c_grid": [0.1, 1.0, 10.0]},
        "few_shot": {"shots": [1, 2, 4], "seeds": [0, 1]},
        "embedding": {"device": "cpu", "batch_size": 16},
    }
    settings = json.dumps({"evaluation": evaluation, "features": {"device": "cpu"}})
    for d in DATASETS:
        assert main(["eval-features", "--dataset", d, "--encoder", "tiny-vit-random", "--settings", settings,
                     "--out", str(results / "eval" / "features" / "tiny-vit-random" / f"{d}.h5"), "--threads", "1"]) == 0
        for m in MODELS:
            assert main(["evaluate", "--model", m, "--dataset", d, "--results", str(results), "--settings", settings,
                         "--tile-features", str(results / "eval" / "features" / "tiny-vit-random" / f"{d}.h5"),
                         "--threads", "1"]) == 0
    return results, settings


def load(results: Path, model: str, dataset: str) -> tuple[dict, pd.DataFrame]:
    folder = results / "eval" / model / dataset
    return json.loads((folder / "metrics.json").read_text()), pd.read_csv(folder / "predictions.csv", keep_default_na=False)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_metrics_equal_sklearn_on_the_written_predictions(workspace, model: str, dataset: str) -> None:
    results, _ = workspace
    m, preds = load(results, model, dataset)
    assert m["status"] == "ok" and m["n_tiles"] == len(preds) == {"nct_crc": 9, "kather2016": 24}[dataset]
    assert m["embedding_source"].startswith("cached features")
    checked = 0
    for task in ("zero_shot", "linear_probe"):
        r = m[task]
        if r["status"] != "ok":
            continue
        tested = preds[preds[task] != ""]
        assert len(tested) == r["n"]
        assert r["weighted_f1"] == pytest.approx(f1_score(tested["label"], tested[task], average="weighted",
                                                          labels=m["classes"], zero_division=0))
        assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(tested["label"], tested[task]))
        assert np.asarray(r["confusion"]).sum() == r["n"]
        assert (results / "eval" / model / dataset / r["confusion_png"]).exists()
        checked += 1
    assert checked == {("frozen-tiny-vit-random", "nct_crc"): 0, ("frozen-tiny-vit-random", "kather2016"): 1,
                       ("untrained", "nct_crc"): 1, ("untrained", "kather2016"): 2}[(model, dataset)]


def test_the_na_cases_say_why(workspace) -> None:
    results, _ = workspace
    frozen, _ = load(results, "frozen-tiny-vit-random", "kather2016")
    assert frozen["zero_shot"]["status"] == "n/a" and "no text side" in frozen["zero_shot"]["reason"]
    nct, _ = load(results, "untrained", "nct_crc")
    assert nct["linear_probe"]["status"] == "n/a" and "1 tile" in nct["linear_probe"]["reason"]
    assert nct["few_shot"]["status"] == "n/a"
    kather, _ = load(results, "untrained", "kather2016")
    lp = kather["linear_probe"]
    assert lp["protocol"] == "kfold" and lp["folds"] == 3 and "smoke test" in lp["protocol_note"]
    assert set(kather["few_shot"]["shots"]) == {"1", "2"} and "4" in kather["few_shot"]["skipped"]
    assert kather["zero_shot"]["n_prompts"]["07_ADIPOSE"] == 50


def test_cached_features_equal_the_pixel_path_and_the_encoder_preprocessing(workspace, shared_data: Path) -> None:
    """Cached features = FrozenImageEncoder on the pixels = a direct pass (area resize, ImageNet norm)."""
    results, settings = workspace
    s = EvaluationSettings.from_dict(json.loads(settings)["evaluation"])
    dataset = TileDataset.load(s.dataset("nct_crc"))
    cached = read_tile_features(results / "eval" / "features" / "tiny-vit-random" / "nct_crc.h5", dataset)
    images = [dataset.read(i) for i in range(len(dataset))]
    encoder = FrozenImageEncoder.load("tiny-vit-random", embedding=s.embedding)
    np.testing.assert_allclose(encoder(images), cached, atol=1e-5)
    import cv2

    x = np.stack([cv2.resize(im, (112, 112), interpolation=cv2.INTER_AREA) / 255.0 for im in images])
    x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.inference_mode():
        direct = encoder.encoder.module(torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(direct, cached, atol=1e-4)
    embedder = build_embedder("untrained", results=results)
    assert isinstance(embedder, MRPLIPEmbedder) and embedder.image_encoder == "tiny-vit-random"
    np.testing.assert_allclose(embedder.embed_images(images, 0.5), embedder.embed_features(cached, 0.5), atol=1e-5)


def test_magnification_comes_from_the_tile_resolution(workspace) -> None:
    """0.495 um/px snaps to the model's 20x like 0.5 does; 0.25 um/px is 40x, a different embedding."""
    results, _ = workspace
    embedder = build_embedder("untrained", results=results)
    feats = np.random.default_rng(0).standard_normal((4, 192)).astype(np.float32)
    at20 = embedder.embed_features(feats, 0.5)
    np.testing.assert_allclose(embedder.embed_features(feats, 0.495), at20)
    assert not np.allclose(embedder.embed_features(feats, 0.25), at20)
    np.testing.assert_allclose(np.linalg.norm(at20, axis=1), 1.0, rtol=1e-5)


def test_a_run_refuses_encoder_weights_other_than_its_features(tmp_path: Path) -> None:
    folder = tmp_path / "features" / "uni"
    folder.mkdir(parents=True)
    with h5py.File(folder / "s.h5", "w") as f:
        f.attrs["weights_sha256"] = "a" * 64
    check_weights_match(folder, "a" * 64, "uni")
    with pytest.raises(ValueError, match="set features.weights.uni"):
        check_weights_match(folder, "b" * 64, "uni")


def test_a_prompt_file_with_more_classes_than_the_tiles(workspace, shared_data: Path, tmp_path: Path) -> None:
    """As a new user would: NCT-CRC tiles without BACK (8 classes) and the shipped nine-class
    nct_crc.json. Zero-shot chooses among the 8 labels and names BACK as unused; the probe rows
    are there. Prompts lacking a label of the tiles are an error of zero-shot alone, naming it."""
    results, settings = workspace
    source = shared_data / "tiles" / "nct_crc_he_100k_samples"
    rows = pd.read_csv(source / "labels.csv")
    rows = rows[rows["label"] != "BACK"]
    table = tmp_path / "no_back.csv"
    rows.assign(path=[str(source / p) for p in rows["path"]]).to_csv(table, index=False)
    prompts = json.loads((REPO / "evaluation" / "prompts" / "nct_crc.json").read_text())
    (tmp_path / "no_tum.json").write_text(json.dumps({**prompts, "classes": {k: v for k, v in prompts["classes"].items()
                                                                              if k != "TUM"}}))
    evaluation = json.loads(settings)["evaluation"]
    for name, prompt_file in (("no_back", REPO / "evaluation" / "prompts" / "nct_crc.json"),
                              ("no_tum", tmp_path / "no_tum.json")):
        evaluation["datasets"] = {name: {"path": str(table), "mpp": 0.5, "prompts": str(prompt_file)}}
        args = json.dumps({"evaluation": evaluation, "features": {"device": "cpu"}})
        assert main(["evaluate", "--model", "untrained", "--dataset", name, "--results", str(results),
                     "--settings", args, "--threads", "1"]) == 0
    ok, _ = load(results, "untrained", "no_back")
    assert ok["zero_shot"]["status"] == "ok" and ok["zero_shot"]["unused_prompt_classes"] == ["BACK"]
    assert len(ok["zero_shot"]["per_class"]) == 8 and "BACK" in ok["zero_shot"]["protocol_note"]
    assert ok["linear_probe"]["status"] in ("ok", "n/a") and "few_shot" in ok
    bad, _ = load(results, "untrained", "no_tum")
    assert bad["zero_shot"]["status"] == "error" and "['TUM']" in bad["zero_shot"]["reason"]
    assert bad["linear_probe"] == ok["linear_probe"]  # the probe does not depend on the prompts
