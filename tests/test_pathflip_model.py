"""PathFLIP: L_slide and L_region against loop references, cross-rank negatives under gloo DDP,
the pooling's weights, the slide table of a run (who is left out and why), exact resume, and
localisation above chance after training on a planted feature-level corpus."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

from mrplip_core.data.slide_texts import SlideTextDataset, SlideTextSettings, build_slide_index
from mrplip_core.layout import Layout
from mrplip_core.losses.pathflip import RegionLoss, SlideCaptionLoss
from mrplip_core.pathflip_model import PathflipDims, PathflipModelSettings, PathFLIPModel, load_pathflip
from mrplip_core.pathflip_model.model import keep_topk
from mrplip_core.testing.pathflip_corpus import TRUTH_FILE, subcaption_kind, tiny_pathflip_settings, write_pathflip_corpus
from mrplip_core.train.pathflip import train_pathflip
from mrplip_core.train.pathflip_config import PathflipTrainConfig


# --- losses against loops -------------------------------------------------------------------
def slide_loss_loop(slide: torch.Tensor, caption: torch.Tensor, tau: float) -> float:
    s = F.normalize(slide, dim=-1).tolist()
    c = F.normalize(caption, dim=-1).tolist()
    n = len(s)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b)) / tau  # noqa: E731
    total = 0.0
    for i in range(n):
        total -= dot(s[i], c[i]) - math.log(sum(math.exp(dot(s[i], c[j])) for j in range(n)))
        total -= dot(s[i], c[i]) - math.log(sum(math.exp(dot(s[j], c[i])) for j in range(n)))
    return total / (2 * n)


def test_slide_loss_equals_a_loop_over_pairs():
    g = torch.Generator().manual_seed(0)
    slide, caption = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    out = SlideCaptionLoss(init_temperature=0.1)(slide, caption)
    assert out["slide"].item() == pytest.approx(slide_loss_loop(slide, caption, 0.1), rel=1e-5)


def _pool_fn(patches: torch.Tensor):
    """A stand-in pooling with a real dependence on the query: softmax(q . patch) weighted mean."""
    def pool(queries: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(queries @ patches.transpose(1, 2), dim=-1)
        return w @ patches
    return pool


def region_loss_loop(patches, text, valid, keys, scale, bias, exclude=True) -> float:
    """Independent: for each slide, every own valid sub-caption (+1) and the first sub-caption of
    every other slide (-1), unless identical to one of its own; mean per slide, then over slides."""
    b = text.shape[0]
    per_slide = []
    for i in range(b):
        terms = []
        own_keys = {int(keys[i, k]) for k in range(text.shape[1]) if valid[i, k]}
        queries = [(text[i, k], 1.0) for k in range(text.shape[1]) if valid[i, k]]
        queries += [(text[j, 0], -1.0) for j in range(b) if j != i and not (exclude and int(keys[j, 0]) in own_keys)]
        for q, y in queries:
            w = torch.softmax(patches[i] @ q, dim=0)
            region = (w[:, None] * patches[i]).sum(0)
            logit = scale * F.cosine_similarity(region, q, dim=0).item() + bias
            terms.append(math.log1p(math.exp(-y * logit)))
        per_slide.append(sum(terms) / len(terms))
    return sum(per_slide) / b


def _region_inputs(seed: int = 0, b: int = 4, k: int = 3, p: int = 6, e: int = 5):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(b, p, e, generator=g)
    text = torch.randn(b, k, e, generator=g)
    valid = torch.ones(b, k, dtype=torch.bool)
    valid[1, 2] = valid[3, 1:] = False  # padding
    keys = torch.arange(b * k).view(b, k)
    text[2, 0] = text[0, 1]  # slide 2's negative is the same text as a positive of slide 0
    keys[2, 0] = keys[0, 1]
    return patches, text, valid, keys


def test_region_loss_equals_a_loop_over_pairs_with_padding_and_identical_texts():
    patches, text, valid, keys = _region_inputs()
    loss = RegionLoss(init_scale=3.0, init_bias=-1.5)
    out = loss(_pool_fn(patches), text, valid, keys)["region"].item()
    assert out == pytest.approx(region_loss_loop(patches, text, valid, keys, 3.0, -1.5), rel=1e-5)
    kept = RegionLoss(init_scale=3.0, init_bias=-1.5, exclude_identical_negatives=False)(_pool_fn(patches), text, valid, keys)
    assert kept["region"].item() == pytest.approx(region_loss_loop(patches, text, valid, keys, 3.0, -1.5, exclude=False), rel=1e-5)
    assert kept["region"].item() != pytest.approx(out)  # the excluded pair mattered


def test_region_loss_refuses_a_slide_without_sub_captions():
    patches, text, valid, keys = _region_inputs()
    valid[2] = False
    with pytest.raises(ValueError, match="at least one sub-caption"):
        RegionLoss()(_pool_fn(patches), text, valid, keys)


# --- gloo DDP: two ranks equal one process ------------------------------------------------
WORLD = 2


def _dist_step(patches, text, valid, keys, weight):
    """Loss and gradients of a parameter shared by the ranks (text = raw @ weight)."""
    weight = weight.clone().requires_grad_()
    loss = RegionLoss(init_scale=3.0, init_bias=-1.0)
    slide_loss = SlideCaptionLoss(init_temperature=0.2)
    t = text @ weight
    region = loss(_pool_fn(patches), t, valid, keys)["region"]
    slide = slide_loss(patches.mean(1), t[:, 0])["slide"]
    (region + slide).backward()
    return {"region": region.detach(), "slide": slide.detach(), "grad": weight.grad.clone(),
            "bias_grad": loss.bias.grad.clone()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        patches, text, valid, keys = _region_inputs()
        weight = torch.eye(text.shape[-1]) + 0.1
        mine = slice(rank * 2, rank * 2 + 2)
        out = _dist_step(patches[mine], text[mine], valid[mine], keys[mine], weight)
        for name in ("grad", "bias_grad"):  # what DDP does: all-reduce, divide by the world size
            dist.all_reduce(out[name])
            out[name] /= WORLD
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_ranks_give_the_single_process_losses_and_gradients(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    patches, text, valid, keys = _region_inputs()
    single = _dist_step(patches, text, valid, keys, torch.eye(text.shape[-1]) + 0.1)
    for term in ("region", "slide"):
        assert (ranks[0][term] + ranks[1][term]).item() / WORLD == pytest.approx(single[term].item(), rel=1e-5)
    for rank in ranks:  # after DDP's average every rank holds the single-process gradient
        torch.testing.assert_close(rank["grad"], single["grad"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rank["bias_grad"], single["bias_grad"], rtol=1e-4, atol=1e-6)


# --- pooling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["soft_topk", "attention"])
def test_pooling_weights_cover_real_patches_only(pooling):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    text = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16), add_pooling_layer=False)
    settings = PathflipModelSettings(embed_dim=8, width=16, heads=2, latents=3, slide_layers=1, pooling=pooling, topk=3)
    model = PathFLIPModel(settings, PathflipDims(12, (5.0, 20.0), 50), text).eval()
    features, level = torch.randn(2, 7, 12), torch.randint(0, 2, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    tokens = model.patch_tokens(features, level)
    region, weights, heatmap = model.pool(tokens, mask, torch.randn(2, 4, 8))
    assert region.shape == (2, 4, 8) and weights.shape == heatmap.shape == (2, 4, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))
    assert float(weights[1, :, 4:].abs().max()) == 0.0 and float(heatmap[1, :, 4:].abs().max()) == 0.0
    if pooling == "soft_topk":
        assert int((weights[0] > 0).sum(-1).max()) == 3  # the top 3 kept
        assert bool((heatmap[0] > 0).all())  # the heatmap still ranks every patch
    assert model.slide_embedding(tokens, mask).shape == (2, 8)


def test_keep_topk_renormalises():
    w = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    torch.testing.assert_close(keep_topk(w, 2), torch.tensor([[0.0, 4 / 7, 3 / 7, 0.0]]))


# --- the run's slide table -----------------------------------------------------------------
def test_left_out_slides_are_recorded_with_their_reason(tmp_path):
    results = write_pathflip_corpus(tmp_path / "results", n_slides=6)
    layout = Layout(results)
    encoder = tiny_pathflip_settings(results)["data"].get("image_encoder") or "tiny-vit-random"
    captions = pd.read_parquet(layout.slide_captions)
    captions.loc[0, ["status", "reason", "caption"]] = ["missing", "no caption in the slide table", None]
    captions = pd.concat([captions, pd.DataFrame([{"slide_id": "ghost", "caption": "Tumour is present.", "source": "file",
                                                  "status": "not_in_slide_table", "reason": "not in the slide table",
                                                  "n_chars": 18}])], ignore_index=True)
    captions.to_parquet(layout.slide_captions)
    pd.read_parquet(layout.subcaptions("planted_001")).iloc[:0].to_parquet(layout.subcaptions("planted_001"))
    with h5py.File(layout.image_features(encoder, "planted_002"), "r+") as f:
        f.attrs.update(status="failed", reason="planted_002: cannot read region")
    layout.image_features(encoder, "planted_003").unlink()
    index = build_slide_index(results, encoder, (20.0,)).set_index("slide_id")
    assert index.loc["planted_000", "status"] == "caption_missing"
    assert index.loc["ghost", "status"] == "caption_not_in_slide_table"
    assert index.loc["planted_001", "status"] == "no_subcaptions"
    assert index.loc["planted_002", "status"] == "features_failed"
    assert "cannot read region" in index.loc["planted_002", "reason"]
    assert index.loc["planted_003", "status"] == "no_features"
    assert (index.loc[["planted_004", "planted_005"], "status"] == "ok").all()
    assert build_slide_index(results, encoder, (40.0,)).set_index("slide_id").loc["planted_004", "status"] == "no_patches"


# --- training -------------------------------------------------------------------------------
def test_a_killed_run_resumes_bitwise(tmp_path):
    results = write_pathflip_corpus(tmp_path / "results", n_slides=8)
    full = PathflipTrainConfig.from_dict(tiny_pathflip_settings(results, train={"steps": 6, "save_every": 3}))
    train_pathflip(full, tmp_path / "full")
    killed = PathflipTrainConfig.from_dict(tiny_pathflip_settings(results, train={"steps": 6, "save_every": 3,
                                                                                   "stop_at_step": 3}))
    train_pathflip(killed, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "model.safetensors").exists()  # stopped: no export yet
    train_pathflip(full, tmp_path / "resumed")
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma = pd.read_csv(tmp_path / "full" / "metrics.csv")
    mb = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    np.testing.assert_array_equal(ma["loss"].to_numpy(), mb["loss"].to_numpy())


def localisation(run_dir: Path, results: Path) -> tuple[float, float]:
    """Mean AUROC of each held-out sub-caption's heatmap against its kind's patches, and
    pointing accuracy (the top patch is of that kind)."""
    from sklearn.metrics import roc_auc_score

    model = load_pathflip(run_dir)
    index = pd.read_parquet(run_dir / "slides.parquet")
    held_out = index[(index["status"] == "ok") & (index["split"] == "val")]
    truth = pd.read_parquet(results / TRUTH_FILE).set_index("patch_id")["kind"]
    data = SlideTextDataset(held_out, results, "tiny-vit-random", model.magnifications, model.tokenizer,
                            SlideTextSettings(), 0)
    aucs, hits = [], []
    for slide in held_out["slide_id"]:
        patches, subs = data.read_patches(slide, None), data.subcaptions(slide)
        heat = model.localize(patches["features"], 20.0, subs).numpy()
        kinds = truth.loc[list(patches["patch_ids"])].to_numpy()
        for q, text in enumerate(subs):
            inside = kinds == subcaption_kind(text)
            aucs.append(roc_auc_score(inside, heat[q]))
            hits.append(bool(inside[heat[q].argmax()]))
    return float(np.mean(aucs)), float(np.mean(hits))


@pytest.mark.timeout(300)
def test_the_trained_model_localises_sub_captions_clearly_above_chance(tmp_path):
    results = write_pathflip_corpus(tmp_path / "results", n_slides=16)
    untrained = PathflipTrainConfig.from_dict(tiny_pathflip_settings(results, train={"steps": 1}, optim={"lr": 1e-12}))
    train_pathflip(untrained, tmp_path / "untrained")
    trained = PathflipTrainConfig.from_dict(tiny_pathflip_settings(results, train={"steps": 200}))
    train_pathflip(trained, tmp_path / "trained")
    auc0, point0 = localisation(tmp_path / "untrained", results)
    auc1, point1 = localisation(tmp_path / "trained", results)
    print(f"held-out AUROC untrained {auc0:.3f} trained {auc1:.3f}; pointing {point0:.2f} -> {point1:.2f}")
    assert auc0 < 0.7  # a random model does not localise
    assert auc1 > 0.85 and point1 > 0.75


def test_the_rest_trains_while_bad_slides_are_left_out(tmp_path):
    """No caption, an over-long caption, failed features: recorded in the run's slides.parquet,
    and the other slides train (multi-magnification form: 5x and 20x patches)."""
    results = write_pathflip_corpus(tmp_path / "results", n_slides=7, magnifications=(5.0, 20.0))
    layout = Layout(results)
    captions = pd.read_parquet(layout.slide_captions)
    captions.loc[0, ["status", "reason"]] = ["too_long", "20000 characters (pathflip.max_caption_chars: 10000)"]
    captions.loc[1, ["status", "reason", "caption"]] = ["empty", "the caption is empty", ""]
    captions.to_parquet(layout.slide_captions)
    with h5py.File(layout.image_features("tiny-vit-random", "planted_002"), "r+") as f:
        f.attrs.update(status="failed", reason="planted_002: truncated file")
    settings = tiny_pathflip_settings(results, train={"steps": 2}, data={"magnifications": [5.0, 20.0], "val_fraction": 0.0})
    train_pathflip(PathflipTrainConfig.from_dict(settings), tmp_path / "run")
    table = pd.read_parquet(tmp_path / "run" / "slides.parquet").set_index("slide_id")
    assert table["status"].to_dict() == {"planted_000": "caption_too_long", "planted_001": "caption_empty",
                                         "planted_002": "features_failed", **{f"planted_00{i}": "ok" for i in range(3, 7)}}
    model = load_pathflip(tmp_path / "run")
    assert model.magnifications == (5.0, 20.0)
    assert model.model.patch_in.magnification is not None  # the magnification embedding is on


@pytest.mark.timeout(300)
def test_torchrun_two_gloo_processes_train_like_one(tmp_path):
    """2 ranks x 2 slides equal 1 rank x 4 slides: the same slides and draws per step, L_slide
    and L_region gathered across ranks with gradient, so the curves agree to float precision."""
    import json
    import os
    import subprocess
    import sys

    results = write_pathflip_corpus(tmp_path / "results", n_slides=8)
    base = tiny_pathflip_settings(results, train={"steps": 4}, data={"val_fraction": 0.0})
    two = {**base, "data": {**base["data"], "batch_size": 2}}
    one = {**base, "data": {**base["data"], "batch_size": 4}}
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "mrplip_core", "pathflip", "--settings", json.dumps({"pathflip": two}),
                             "--run-dir", str(tmp_path / "ddp")], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    train_pathflip(PathflipTrainConfig.from_dict(one), tmp_path / "single")
    log, _ = proc.communicate(timeout=280)
    assert proc.returncode == 0, log[-4000:]
    ddp, single = pd.read_csv(tmp_path / "ddp" / "metrics.csv"), pd.read_csv(tmp_path / "single" / "metrics.csv")
    for key in ("slide", "region", "loss"):
        np.testing.assert_allclose(ddp[key].to_numpy(), single[key].to_numpy(), rtol=1e-4, err_msg=key)
