"""``mrplip embed``: tile embeddings equal the evaluation stage's for the same tiles (real
NCT-CRC tiles through the run's frozen encoder and MR-PLIP image side), PathFLIP slide and text
embeddings, the HDF5 layout and attrs (read with h5py alone), and bad inputs named and recorded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mrplip_core.cli import main  # noqa: E402
from mrplip_core.evaluation.datasets import TileDataset  # noqa: E402
from mrplip_core.evaluation.embedders import build_embedder  # noqa: E402
from mrplip_core.evaluation.run import embed_dataset  # noqa: E402
from mrplip_core.evaluation.settings import DatasetSpec  # noqa: E402
from mrplip_core.layout import Layout  # noqa: E402
from mrplip_core.testing.known_answers import write_untrained_run  # noqa: E402
from mrplip_core.testing.pathflip_corpus import tiny_pathflip_settings, write_pathflip_corpus  # noqa: E402
from mrplip_core.train.pathflip import train_pathflip  # noqa: E402
from mrplip_core.train.pathflip_config import PathflipTrainConfig  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    results = tmp_path_factory.mktemp("embed") / "results"
    write_untrained_run(Layout(results).run_dir("untrained"))  # MR-PLIP over tiny-vit-random (192-d)
    write_pathflip_corpus(results, n_slides=4)
    train_pathflip(PathflipTrainConfig.from_dict(tiny_pathflip_settings(results, train={"steps": 2})),
                   Layout(results).pathflip_dir("tiny"))
    return results


def test_tile_embeddings_equal_the_evaluation_stage_and_the_file_describes_the_model(results, shared_data, tmp_path):
    csv = shared_data / "tiles" / "nct_crc_he_100k_samples" / "labels.csv"
    out = tmp_path / "tiles.h5"
    assert main(["embed", "--model", "untrained", "--results", str(results), "--tiles", str(csv), "--mpp", "0.5",
                 "--out", str(out)]) == 0
    dataset = TileDataset.load(DatasetSpec(name="nct_crc", path=str(csv), mpp=0.5))
    expected, source = embed_dataset(build_embedder("untrained", results=results), dataset)
    assert source == "tile pixels"
    with h5py.File(out, "r") as f:
        got = f["tiles/embeddings"][()]
        assert [Path(p) for p in f["tiles/paths"].asstr()[()]] == list(dataset.paths)
        assert np.allclose(f["tiles/mpp"][()], 0.5)
        attrs = dict(f.attrs)
        tile_attrs = dict(f["tiles"].attrs)
        assert "failed" not in f and "slides" not in f
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert got.shape == (9, 32)
    assert attrs["format"] == "mrplip.embeddings/1" and attrs["model"] == "mrplip-untrained"
    assert attrs["model_format"] == "mrplip.pretrained/1" and attrs["image_encoder"] == "tiny-vit-random"
    assert json.loads(attrs["settings"])["mpp"] == 0.5 and attrs["package"] == "mrplip"
    assert tile_attrs["encoder"] == "tiny-vit-random" and len(tile_attrs["weights_sha256"]) == 64


def test_slide_and_text_embeddings_of_a_pathflip_run(results, tmp_path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"tumour": ["tumour cells", "carcinoma"], "stroma": "fibrous stroma"}))
    out = tmp_path / "slides.h5"
    slides = ["planted_000", "planted_001", "planted_002"]
    assert main(["embed", "--model", "pathflip/tiny", "--results", str(results), "--slides", *slides,
                 "--prompts", str(prompts), "--out", str(out)]) == 0
    from mrplip_core.pathflip_model import load_pathflip
    from mrplip_core.use.patches import read_slide_patches

    model = load_pathflip(Layout(results).pathflip_dir("tiny"))
    patches = read_slide_patches(results, "tiny-vit-random", "planted_001", model.magnifications)
    with h5py.File(out, "r") as f:
        assert list(f["slides/slide_ids"].asstr()[()]) == slides
        assert list(f["slides/n_patches"][()]) == [64, 64, 64]
        np.testing.assert_allclose(f["slides/embeddings"][1], model.encode_slide(patches.features, 20.0).numpy(), atol=1e-5)
        assert list(f["texts/texts"].asstr()[()]) == ["tumour cells", "carcinoma", "fibrous stroma"]
        assert list(f["texts/keys"].asstr()[()]) == ["tumour", "tumour", "stroma"]
        np.testing.assert_allclose(f["texts/embeddings"][()], model.encode_text(["tumour cells", "carcinoma",
                                                                                 "fibrous stroma"]).numpy(), atol=1e-5)
        assert f.attrs["family"] == "pathflip" and f.attrs["fingerprint"] == model.meta["fingerprint"]


def test_bad_inputs_are_named_and_the_rest_embedded(results, shared_data, tmp_path, capsys) -> None:
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    src = sorted((shared_data / "tiles" / "nct_crc_he_100k_samples").rglob("*.tif"))[:2]
    for i, p in enumerate(src):
        shutil.copy(p, tiles / f"{i}{p.suffix}")
    (tiles / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "t.h5"
    argv = ["embed", "--model", "untrained", "--results", str(results), "--tiles", str(tiles), "--mpp", "0.5",
            "--out", str(out)]
    assert main(argv) == 2
    assert "broken.png" in capsys.readouterr().err
    with h5py.File(out, "r") as f:
        assert f["tiles/embeddings"].shape == (2, 32)
        assert list(f["failed/kind"].asstr()[()]) == ["tile"] and "broken.png" in f["failed/item"].asstr()[0]
    assert main(argv + ["--keep-going"]) == 0
    # slides: an unknown one and a PathFLIP-only input given to MR-PLIP
    out2 = tmp_path / "s.h5"
    assert main(["embed", "--model", "pathflip/tiny", "--results", str(results), "--slides", "planted_000", "nope",
                 "--out", str(out2)]) == 2
    assert "slide nope" in capsys.readouterr().err
    with h5py.File(out2, "r") as f:
        assert f["slides/embeddings"].shape[0] == 1 and "'nope'" in f["failed/error"].asstr()[0]
    assert main(["embed", "--model", "untrained", "--results", str(results), "--slides", "planted_000",
                 "--out", str(tmp_path / "x.h5")]) == 2
    assert "MR-PLIP has no slide encoder" in capsys.readouterr().err
    assert main(["embed", "--model", "untrained", "--results", str(results), "--tiles", str(tiles),
                 "--out", str(tmp_path / "x.h5")]) == 2
    assert "--mpp" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert main(["embed", "--model", "untrained", "--results", str(results), "--prompts", str(empty),
                 "--out", str(tmp_path / "x.h5")]) == 2
    assert "no text in the file" in capsys.readouterr().err
