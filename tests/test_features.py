"""Image and text features of a real slide, read back with h5py and checked against a direct pass.

The slide is CMU-1-Small-Region.svs (0.499 um/px, one level), tiled by the tiles stage's
own function at 5x/10x/20x with 256 px patches; the encoder is the seeded tiny-vit-random.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import cv2  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import mrplip_core  # noqa: E402
from mrplip_core.encoders import load_image_encoder, load_text_encoder  # noqa: E402
from mrplip_core.encoders.image import ImageEncoder, resize_patch  # noqa: E402
from mrplip_core.encoders.weights import file_sha256, state_dict_sha256  # noqa: E402
from mrplip_core.features import FeatureSettings  # noqa: E402
from mrplip_core.features.dataset import PatchDataset  # noqa: E402
from mrplip_core.features.image import extract_image_features  # noqa: E402
from mrplip_core.features.text import extract_text_features  # noqa: E402
from mrplip_core.wsi.slide import Slide, SlideError  # noqa: E402
from mrplip_core.wsi.synthetic import write_synthetic_slide  # noqa: E402
from mrplip_core.wsi.tiling import TilesOutputs, TilesSettings, tile_slide  # noqa: E402

SLIDE_ID = "CMU-1-Small-Region"
TILING = {"tiling": {"magnifications": [5, 10, 20], "patch_px": 256, "n_parents": 2, "selection": "most_tissue",
                     "min_tissue_fraction": 0.3}}
CPU = FeatureSettings(device="cpu", batch_size=16, num_workers=0)


@pytest.fixture(autouse=True)
def digest_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("MRPLIP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def tile(slide: Path, out: Path, slide_id: str = SLIDE_ID) -> TilesOutputs:
    outs = TilesOutputs(out / f"{slide_id}.parquet", out / "t.geojson", out / "t.png", out / f"{slide_id}.json")
    tile_slide(slide_id, slide, outs, TilesSettings.from_dict(TILING))
    return outs


@pytest.fixture(scope="module")
def cmu(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TilesOutputs:
    return tile(shared_data / "slides" / "CMU-1-Small-Region.svs", tmp_path_factory.mktemp("tiles"))


@pytest.fixture(scope="module")
def cmu_features(cmu: TilesOutputs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Features written by two DataLoader workers, batches of 16 (the last one partial)."""
    out = tmp_path_factory.mktemp("features") / "tiny-vit-random" / f"{SLIDE_ID}.h5"
    summary = extract_image_features(SLIDE_ID, cmu.manifest, cmu.record, out, replace(CPU, num_workers=2))
    return out, summary


@pytest.fixture(scope="module")
def tiny() -> ImageEncoder:
    """The seeded tiny-vit-random, built once for the tests that are not about building it."""
    return load_image_encoder("tiny-vit-random")


def reference_features(manifest: pd.DataFrame, record: dict, model: torch.nn.Module) -> np.ndarray:
    """A direct forward pass: Slide.read_region, cv2 area resize, ImageNet normalisation, fp32."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    images = []
    with Slide(record["path"], SLIDE_ID, mpp=record["mpp"]) as slide:
        for r in manifest.itertuples():
            patch = slide.read_region(r.x, r.y, r.size, r.patch_px, level=r.read_level)
            patch = cv2.resize(patch, (112, 112), interpolation=cv2.INTER_AREA)
            images.append(((patch / 255.0 - mean) / std).transpose(2, 0, 1))
    with torch.inference_mode():
        return model(torch.tensor(np.stack(images), dtype=torch.float32)).numpy()


def test_features_match_a_direct_forward_pass_and_the_manifest(cmu, cmu_features, tiny) -> None:
    out, summary = cmu_features
    manifest = pd.read_parquet(cmu.manifest)
    record = json.loads(cmu.record.read_text())
    assert summary["status"] == "ok" and summary["n_patches"] == len(manifest) == 2 * (1 + 4 + 16)
    expected = reference_features(manifest, record, tiny.module)
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["10x", "20x", "5x"] and list(f.attrs["magnifications"]) == ["5x", "10x", "20x"]
        seen = []
        for mag in (5.0, 10.0, 20.0):
            g = f[f"{mag:g}x"]
            rows = np.flatnonzero(manifest["magnification"].to_numpy() == mag)
            sub = manifest.iloc[rows]
            assert list(g["patch_ids"].asstr()[()]) == sub["patch_id"].tolist()
            assert g["rows"][()].tolist() == rows.tolist()
            assert g["coords"][()].tolist() == sub[["x", "y"]].to_numpy().tolist()
            feats = g["features"][()]
            assert feats.dtype == np.float16 and feats.shape == (len(rows), g.attrs["dim"])
            np.testing.assert_allclose(feats.astype(np.float32), expected[rows], rtol=1e-2, atol=5e-3)
            assert g.attrs["magnification"] == mag and g.attrs["n"] == len(rows)
            assert g.attrs["size"] == sub["size"].iloc[0] and g.attrs["patch_px"] == 256
            seen += rows.tolist()
        assert sorted(seen) == list(range(len(manifest)))


def test_attrs_say_what_the_file_holds(cmu_features) -> None:
    out, _ = cmu_features
    model = load_image_encoder("tiny-vit-random").module
    with h5py.File(out, "r") as f:
        a = dict(f.attrs)
        dims = {f[g]["features"].shape[1] for g in f}
    assert a["status"] == "ok" and a["reason"] == "" and a["slide_id"] == SLIDE_ID
    assert a["encoder"] == "tiny-vit-random" and a["architecture"] == "vit_tiny_patch16_224"
    assert dims == {a["dim"]} == {192}
    assert a["input_px"] == 112 and a["interpolation"] == "area"
    assert list(a["mean"]) == [0.485, 0.456, 0.406] and list(a["std"]) == [0.229, 0.224, 0.225]
    assert a["precision"] == "fp32" and a["device"] == "cpu" and a["features_dtype"] == "float16"
    assert a["weights"] == "random-init" and a["weights_sha256"] == state_dict_sha256(model.state_dict())
    assert a["package_version"] == mrplip_core.__version__ and a["torch_version"] == torch.__version__
    assert a["n_patches"] == 42 and a["num_workers"] == 2 and a["batch_size"] == 16 and a["read"] == "manifest"


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> TilesOutputs:
    """A synthetic 40x pyramidal TIFF (downsamples 1, 4): 5x/10x read from level 1, 20x/40x from level 0."""
    out = tmp_path_factory.mktemp("pyramid")
    slide = write_synthetic_slide(out / "synthetic.tiff", 4096, 3072, 0.25, seed=3)
    outs = TilesOutputs(out / "s.parquet", out / "t.geojson", out / "t.png", out / "s.json")
    tiling = {**TILING["tiling"], "magnifications": [5, 10, 20, 40], "patch_px": 128, "min_tissue_fraction": 0.1}
    tile_slide("synthetic", slide, outs, TilesSettings.from_dict({"tiling": tiling}))
    return outs


@pytest.mark.parametrize("slide_fixture", ["cmu", "pyramid"])
def test_children_cropped_from_a_parent_read_are_bit_identical(slide_fixture, request) -> None:
    """Shared reads give exactly Slide.read_region's patch, whatever order the rows come in."""
    outs = request.getfixturevalue(slide_fixture)
    manifest = pd.read_parquet(outs.manifest)
    record = json.loads(outs.record.read_text())
    with Slide(record["path"], "s", mpp=record["mpp"]) as slide:
        expected = [slide.read_region(r.x, r.y, r.size, r.patch_px, level=r.read_level) for r in manifest.itertuples()]
    in_order = PatchDataset(record["path"], "s", record["mpp"], manifest, 112)
    for i, patch in enumerate(expected):
        assert np.array_equal(in_order.encoder_input(i), resize_patch(patch, 112)), i
    cropped = in_order.sources != np.arange(len(manifest))
    # one level (CMU): every non-root patch is a crop of its bag root; the pyramid: 10x and 40x
    mags = manifest["magnification"].to_numpy()
    assert cropped.tolist() == (mags != 5 if slide_fixture == "cmu" else (mags == 10) | (mags == 40)).tolist()
    shuffled = np.random.default_rng(0).permutation(len(manifest))
    for cache_bytes in (1, 2**30):  # nothing fits, every patch read alone; everything kept
        ds = PatchDataset(record["path"], "s", record["mpp"], manifest, 112, cache_bytes=cache_bytes)
        for i in shuffled:
            assert np.array_equal(ds.read(int(i)), expected[i]), i


def test_pyramid_read_mode_reads_the_box_at_input_size(cmu, tiny, tmp_path) -> None:
    out = tmp_path / "pyramid.h5"
    extract_image_features(SLIDE_ID, cmu.manifest, cmu.record, out, replace(CPU, read="pyramid"), encoder=tiny)
    manifest = pd.read_parquet(cmu.manifest)
    record = json.loads(cmu.record.read_text())
    enc = tiny
    with Slide(record["path"], SLIDE_ID, mpp=record["mpp"]) as slide:
        images = [slide.read_region(r.x, r.y, r.size, 112) for r in manifest.itertuples()]
    with torch.inference_mode():
        expected = enc.module(enc.normalize(torch.from_numpy(np.stack(images)))).numpy()
    with h5py.File(out, "r") as f:
        assert f.attrs["read"] == "pyramid"
        for g in f.values():
            np.testing.assert_allclose(g["features"][()].astype(np.float32), expected[g["rows"][()]], rtol=1e-2, atol=5e-3)


def test_configured_weights_file_is_used_and_fingerprinted(cmu, tmp_path) -> None:
    weights = tmp_path / "tiny.safetensors"
    model = load_image_encoder("tiny-vit-random").module
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # different from the seeded init
    save_file(model.state_dict(), str(weights))
    settings = replace(CPU, weights={"tiny-vit-random": str(weights)})
    out = tmp_path / "f.h5"
    extract_image_features(SLIDE_ID, cmu.manifest, cmu.record, out, settings)
    with h5py.File(out, "r") as f:
        assert f.attrs["weights"] == str(weights) and f.attrs["weights_sha256"] == file_sha256(weights)
        first = f["5x"]["features"][0]
    manifest = pd.read_parquet(cmu.manifest)
    record = json.loads(cmu.record.read_text())
    with Slide(record["path"], SLIDE_ID, mpp=record["mpp"]) as slide:
        r = manifest.iloc[0]
        patch = slide.read_region(int(r.x), int(r.y), int(r["size"]), int(r.patch_px), level=int(r.read_level))
    enc = load_image_encoder("tiny-vit-random", weights)
    with torch.inference_mode():
        direct = enc.module(enc.normalize(torch.from_numpy(cv2.resize(patch, (112, 112), interpolation=cv2.INTER_AREA))[None]))
    np.testing.assert_allclose(first.astype(np.float32), direct[0].numpy(), rtol=1e-2, atol=5e-3)


def test_failed_slide_gets_a_valid_file_with_zero_rows(shared_data, tmp_path) -> None:
    outs = tile(shared_data / "slides" / "broken.svs", tmp_path, "broken")
    out = tmp_path / "broken.h5"
    summary = extract_image_features("broken", outs.manifest, outs.record, out, CPU)
    assert summary["status"] == "empty"
    with h5py.File(out, "r") as f:
        assert list(f) == [] and f.attrs["n_patches"] == 0 and f.attrs["status"] == "empty"
        assert "tiles stage failed" in f.attrs["reason"] and "broken" in f.attrs["reason"]
        assert f.attrs["dim"] == 192 and f.attrs["encoder"] == "tiny-vit-random"


def test_slide_unreadable_at_feature_time_is_recorded_or_raised(cmu, tiny, tmp_path) -> None:
    record = json.loads(cmu.record.read_text())
    record["path"] = str(tmp_path / "moved-away.svs")
    moved = tmp_path / "record.json"
    moved.write_text(json.dumps(record))
    out = tmp_path / "f.h5"
    summary = extract_image_features(SLIDE_ID, cmu.manifest, moved, out, CPU, encoder=tiny)
    assert summary["status"] == "failed" and SLIDE_ID in summary["error"]
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "failed" and "file not found" in f.attrs["reason"] and list(f) == []
    out.unlink()
    with pytest.raises(SlideError, match="file not found"):
        extract_image_features(SLIDE_ID, cmu.manifest, moved, out, replace(CPU, failures_fatal=True), encoder=tiny)
    assert not out.exists()


def test_a_crash_mid_slide_leaves_no_file(cmu, tiny, tmp_path, monkeypatch) -> None:
    enc = tiny  # monkeypatch restores its forward afterwards
    calls = {"n": 0}
    forward = enc.module.forward

    def crash_on_second_batch(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kill")
        return forward(x)

    monkeypatch.setattr(enc.module, "forward", crash_on_second_batch)
    out = tmp_path / "features" / "x.h5"
    with pytest.raises(RuntimeError, match="simulated kill"):
        extract_image_features(SLIDE_ID, cmu.manifest, cmu.record, out, CPU, encoder=enc)
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])


def test_text_features_of_keywords_and_captions(cmu, tmp_path) -> None:
    manifest = pd.read_parquet(cmu.manifest)
    ids = manifest["patch_id"].tolist()
    captions = pd.DataFrame({
        "patch_id": ids[:5],
        "caption": ["Dermis with dense collagen.", "Epidermis with keratinocytes.", "Dermis with dense collagen.",
                    "word " * 400, None],  # None: the captioner failed on that patch
    })
    bags = manifest["bag_id"].unique().tolist()
    keywords = pd.DataFrame({
        "bag_id": [bags[0], bags[0], bags[1]],
        "keyword": ["collagen", "keratinocytes", "collagen"],
        "patch_ids": [ids[:2], ids[1:2], ids[21:23]],
    })
    captions.to_parquet(tmp_path / "captions.parquet")
    keywords.to_parquet(tmp_path / "keywords.parquet")
    out = tmp_path / "text.h5"
    enc = load_text_encoder("minilm")  # what settings.text_encoder names; built once for both uses
    summary = extract_text_features(
        SLIDE_ID, tmp_path / "captions.parquet", tmp_path / "keywords.parquet", out, CPU, encoder=enc
    )
    assert summary["n_distinct_keywords"] == 2 and summary["n_truncated_captions"] == 1
    assert summary["n_captions"] == 4 and summary["n_captions_missing"] == 1
    captions = captions.head(4)
    with h5py.File(out, "r") as f:
        k, c = f["keywords"], f["captions"]
        assert list(k["bag_id"].asstr()[()]) == keywords["bag_id"].tolist()
        assert list(k["keyword"].asstr()[()]) == keywords["keyword"].tolist()
        assert list(c["patch_id"].asstr()[()]) == captions["patch_id"].tolist()
        kf, cf = k["features"][()], c["features"][()]
        assert kf.dtype == np.float16 and kf.shape == (3, 384) and cf.shape == (4, 384)
        np.testing.assert_allclose(kf.astype(np.float32), enc.encode(keywords["keyword"].tolist()), atol=2e-3)
        np.testing.assert_allclose(cf.astype(np.float32), enc.encode(captions["caption"].tolist()), atol=2e-3)
        assert np.array_equal(kf[0], kf[2]) and np.array_equal(cf[0], cf[2])
        assert f.attrs["encoder"] == "minilm" and f.attrs["normalized"] and f.attrs["max_tokens"] == 256
        assert f.attrs["weights_sha256"] == file_sha256(enc.weights.source) and f.attrs["status"] == "ok"

    # A slide with no captions and no keywords (failed upstream): valid groups with zero rows.
    captions.head(0).to_parquet(tmp_path / "captions.parquet")
    keywords.head(0).to_parquet(tmp_path / "keywords.parquet")
    extract_text_features(SLIDE_ID, tmp_path / "captions.parquet", tmp_path / "keywords.parquet", out, CPU, encoder=enc)
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "empty" and f["keywords/features"].shape == (0, 384)
        assert f["captions/features"].shape == (0, 384) and f["captions/patch_id"].shape == (0,)


def test_features_stage_runs_in_snakemake(cmu, repo_root, tmp_path) -> None:
    """Rule features_slide under Snakemake on the real slide: gpu=1 does not block a local run.

    The tiles stage's outputs are the module fixture's (made by the same library call the
    tiles rule makes), and the target is the image features file, so only the features job
    runs here (the stage target `features` also builds the text features, which need the
    captions stage: tests/test_captions_workflow.py territory).
    """
    work = tmp_path / "wf"
    for src, dst in ((cmu.manifest, "results/tiles"), (cmu.geojson, "results/tissue"), (cmu.qc, "results/tissue"),
                     (cmu.record, "results/slides")):
        (work / dst).mkdir(parents=True, exist_ok=True)
        suffix = "".join(Path(src).suffixes)
        shutil.copy(src, work / dst / f"{SLIDE_ID}{suffix}")
    record = json.loads(cmu.record.read_text())
    (work / "slides.tsv").write_text(f"slide_id\tpath\n{SLIDE_ID}\t{record['path']}\n")
    config = yaml.safe_load((repo_root / "config.yaml").read_text())
    config.update(TILING, slides="slides.tsv")
    config["features"].update(batch_size=32, threads=2)
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    target = f"results/features/tiny-vit-random/{SLIDE_ID}.h5"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo_root / "workflow" / "Snakefile"), "-d", str(work),
           "--cores", "2", target]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "features_slide" in proc.stderr and "tiles_slide" not in proc.stderr
    with h5py.File(work / target, "r") as f:
        assert f.attrs["status"] == "ok" and f.attrs["n_patches"] == 42 and f.attrs["num_workers"] == 2
    # Resumable: finished slides are not redone, and tuning throughput settings is no rerun trigger.
    config["features"].update(batch_size=8, threads=1)
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    again = subprocess.run([*cmd, "-n"], capture_output=True, text=True, timeout=120)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_a_shard_builds_the_encoder_once_and_its_rerun_reuses_finished_slides(cmu, cmu_features, tmp_path,
                                                                             monkeypatch) -> None:
    """features.slides_per_job > 1: one encoder load for the shard; after a kill (Snakemake
    deletes the shard's outputs) the rerun links finished slides back and encodes the rest."""
    import mrplip_core.encoders.image as image_module
    from mrplip_core.features.shard import PARTS, extract_image_shard, parts_key

    results = tmp_path / "results"
    for sid in ("A", "B"):
        for src, sub, suffix in ((cmu.manifest, "tiles", ".parquet"), (cmu.record, "slides", ".json")):
            (results / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, results / sub / f"{sid}{suffix}")
    loads = []
    real_load = image_module.load_image_encoder
    monkeypatch.setattr(image_module, "load_image_encoder", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    first = extract_image_shard(["A", "B"], results, CPU, trigger="t1", threads=1)
    assert [s["status"] for s in first] == ["ok", "ok"] and len(loads) == 1
    with h5py.File(cmu_features[0], "r") as f:
        single = {g: f[g]["features"][:] for g in f if isinstance(f[g], h5py.Group) and "features" in f[g]}
    out = results / "features" / "tiny-vit-random"
    for sid in ("A", "B"):
        with h5py.File(out / f"{sid}.h5", "r") as f:
            for g, want in single.items():  # the same features as a job per slide
                np.testing.assert_allclose(f[g]["features"][:].astype(np.float32), want.astype(np.float32), atol=2e-3)

    # a killed shard: Snakemake removed both outputs; B had not finished its part
    for sid in ("A", "B"):
        (out / f"{sid}.h5").unlink()
    (out / PARTS / parts_key("t1") / "B.h5").unlink()
    rerun = extract_image_shard(["A", "B"], results, CPU, trigger="t1", threads=1)
    assert [s["status"] for s in rerun] == ["reused", "ok"] and len(loads) == 2
    assert (out / "A.h5").exists() and (out / "B.h5").exists()
    # a re-tiled slide (its manifest newer than its part) is encoded again
    os.utime(results / "tiles" / "A.parquet", ns=(time.time_ns() + 10**9,) * 2)
    assert [s["status"] for s in extract_image_shard(["A"], results, CPU, trigger="t1")] == ["ok"]
    assert len(loads) == 3
    # other settings or weights (another trigger): nothing is reused
    other = extract_image_shard(["A"], results, CPU, trigger="t2", threads=1)
    assert [s["status"] for s in other] == ["ok"] and len(loads) == 4


def copy_slide_inputs(cmu: TilesOutputs, results: Path, sid: str) -> None:
    for src, sub, suffix in ((cmu.manifest, "tiles", ".parquet"), (cmu.record, "slides", ".json")):
        (results / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, results / sub / f"{sid}{suffix}")


def test_a_shard_reads_all_slides_through_one_loader_and_records_an_unreadable_one(cmu, pyramid, tiny, tmp_path,
                                                                                  monkeypatch) -> None:
    """Two different slides around an unreadable one, two workers: the unreadable one is
    recorded as failed with a one-line reason; each good slide gets its own patches' features
    (the pyramid's 170 rows come in two bag chunks); fixed, the rerun encodes only it."""
    import mrplip_core.features.image as image_module
    from mrplip_core.features.shard import PARTS, extract_image_shard, parts_key

    results = tmp_path / "results"
    for sid, outs in (("A", cmu), ("BAD", cmu), ("P", pyramid)):
        copy_slide_inputs(outs, results, sid)
    record = json.loads(cmu.record.read_text())
    (results / "slides" / "BAD.json").write_text(json.dumps({**record, "path": str(tmp_path / "gone.svs")}))
    loaders = []
    real_loader = image_module.patch_loader
    monkeypatch.setattr(image_module, "patch_loader", lambda *a, **k: loaders.append(a) or real_loader(*a, **k))
    settings = replace(CPU, num_workers=2, batch_size=48)  # batches straddle slides and chunks

    first = extract_image_shard(["A", "BAD", "P"], results, settings, trigger="t1", threads=2)
    assert [s["status"] for s in first] == ["ok", "failed", "ok"] and len(loaders) == 1
    error = first[1]["error"]
    assert "BAD" in error and "file not found" in error and "\n" not in error and "Traceback" not in error
    out = results / "features" / "tiny-vit-random"
    with h5py.File(out / "BAD.h5", "r") as f:
        assert f.attrs["status"] == "failed" and f.attrs["reason"] == error and list(f) == []
    for sid, outs in (("A", cmu), ("P", pyramid)):
        manifest = pd.read_parquet(outs.manifest)
        expected = reference_features(manifest, json.loads(outs.record.read_text()), tiny.module)
        with h5py.File(out / f"{sid}.h5", "r") as f:
            assert f.attrs["status"] == "ok" and f.attrs["n_patches"] == len(manifest)
            for g in f.values():
                assert list(g["patch_ids"].asstr()[()]) == manifest["patch_id"].iloc[g["rows"][()]].tolist()
                np.testing.assert_allclose(g["features"][()].astype(np.float32), expected[g["rows"][()]],
                                           rtol=1e-2, atol=5e-3)

    (results / "slides" / "BAD.json").write_text(json.dumps(record))  # the file is back
    rerun = extract_image_shard(["A", "BAD", "P"], results, settings, trigger="t1", threads=2)
    assert [s["status"] for s in rerun] == ["reused", "ok", "reused"]
    # new settings: the old parts of these slides go once the new ones are made
    extract_image_shard(["A"], results, settings, trigger="t2", threads=2)
    assert not (out / PARTS / parts_key("t1") / "A.h5").exists() and (out / PARTS / parts_key("t1") / "P.h5").exists()


def test_workers_read_whole_bags(pyramid) -> None:
    from mrplip_core.features.dataset import ShardPatches

    manifest = pd.read_parquet(pyramid.manifest)
    record = json.loads(pyramid.record.read_text())
    ds = PatchDataset(record["path"], "s", record["mpp"], manifest, 112)
    bags = manifest["bag_id"].tolist()
    assert len(set(bags)) == 2 and len(bags) == 170
    assert ds.chunks(96) == [(0, 85), (85, 170)]  # a bag never split, two never merged past 96
    assert ds.chunks(200) == [(0, 170)] and ds.chunks(10) == [(0, 85), (85, 170)]
    shard = ShardPatches([ds, ds])
    assert shard.chunks(96) == [list(range(0, 85)), list(range(85, 170)), list(range(170, 255)),
                                list(range(255, 340))]
    assert shard.slide_of(169) == 0 and shard.slide_of(170) == 1


def test_trouble_of_the_machine_is_raised_not_recorded_as_a_failed_slide(cmu, tiny, tmp_path, monkeypatch) -> None:
    import errno

    from mrplip_core.features.dataset import slide_failure

    import openslide

    assert slide_failure(FileNotFoundError(errno.ENOENT, "gone")) and slide_failure(cv2.error("bad tile"))
    assert slide_failure(SlideError("slide 's': read failed: Not a JPEG file: starts with 0xff 0xd9"))
    assert not slide_failure(OSError(errno.EMFILE, "Too many open files")) and not slide_failure(KeyError("x"))
    # OpenSlide's and OpenCV's errors carry no errno, only the system's words
    assert not slide_failure(openslide.OpenSlideError(f"TIFFReadTile: {os.strerror(errno.EIO)}"))
    assert not slide_failure(cv2.error("(-4:Insufficient memory) Failed to allocate 12582912 bytes"))

    def full_disk(self, i):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PatchDataset, "encoder_input", full_disk)
    out = tmp_path / "f.h5"
    with pytest.raises(OSError, match="No space left"):
        extract_image_features(SLIDE_ID, cmu.manifest, cmu.record, out, CPU, encoder=tiny)
    assert not out.exists()


def test_compiled_encoder_sees_only_full_batches_and_gives_the_same_features(cmu, cmu_features, tiny, tmp_path,
                                                                            monkeypatch) -> None:
    """compile: true pads the last batch (42 patches = 16 + 16 + 10 -> three batches of 16), so a
    compiled graph never sees a new shape; the padding never reaches the file."""
    import mrplip_core.features.image as image_module

    shapes = []

    def fake_compile(module, dynamic=None):  # torch.compile's contract here: same outputs, static shapes
        assert dynamic is False
        return lambda x: shapes.append((tuple(x.shape), x.stride())) or module(x)

    monkeypatch.setattr(image_module.torch, "compile", fake_compile)
    out = tmp_path / "compiled.h5"
    extract_image_features(SLIDE_ID, cmu.manifest, cmu.record, out, replace(CPU, compile=True), encoder=tiny)
    channels_last = torch.empty(16, 3, 112, 112).to(memory_format=torch.channels_last).stride()
    assert shapes == [((16, 3, 112, 112), channels_last)] * 3  # the padded batch too: no recompile
    with h5py.File(out, "r") as f, h5py.File(cmu_features[0], "r") as ref:
        assert f.attrs["compile"] and f.attrs["n_patches"] == 42
        for g in ref:
            np.testing.assert_allclose(f[g]["features"][:].astype(np.float32), ref[g]["features"][:].astype(np.float32),
                                       atol=2e-3)


def test_bf16_autocast_features_stay_close_to_fp32(cmu, cmu_features, tiny, tmp_path) -> None:
    out = tmp_path / "bf16.h5"
    extract_image_features(SLIDE_ID, cmu.manifest, cmu.record, out, replace(CPU, precision="bf16"), encoder=tiny)
    with h5py.File(out, "r") as f, h5py.File(cmu_features[0], "r") as ref:
        assert f.attrs["precision"] == "bf16"
        for g in ref:
            got, want = f[g]["features"][:].astype(np.float32), ref[g]["features"][:].astype(np.float32)
            cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            assert cos.min() > 0.99 and not np.array_equal(got, want)  # bf16 did run, and changed little


def test_an_empty_file_records_the_same_input_as_a_built_encoder(shared_data, tmp_path) -> None:
    """A slide with no patches gets the encoder's attrs without building it: for QuiltNet the
    weights folder's preprocess_cfg decides input size and mean/std, as when it is built."""
    import json as _json

    from test_encoders import open_clip_folder

    folder = tmp_path / "quiltnet"
    folder.mkdir()
    reference = open_clip_folder(folder)
    config = _json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"] = {"size": 160, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (folder / "open_clip_config.json").write_text(_json.dumps(config))
    save_file(reference.state_dict(), str(folder / "open_clip_model.safetensors"))
    settings = replace(CPU, image_encoder="quiltnet", weights={"quiltnet": str(folder)}, allow_random_init=False)
    outs = tile(shared_data / "slides" / "broken.svs", tmp_path, "broken")
    out = tmp_path / "broken.h5"
    assert extract_image_features("broken", outs.manifest, outs.record, out, settings)["status"] == "empty"
    built = load_image_encoder("quiltnet", folder).attrs()
    with h5py.File(out, "r") as f:
        for key in ("input_px", "mean", "std", "weights", "weights_sha256", "encoder"):
            assert np.array_equal(f.attrs[key], built[key]), key
        assert f.attrs["input_px"] == 160
