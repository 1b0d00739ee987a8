"""Pretraining on small synthetic feature files: every loss term goes down, a run killed
at step k and resumed ends bitwise equal to an uninterrupted run, checkpoints load
without unpickling, ablations are config changes, and the CLI resolves configs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mrplip_core.testing.synthetic_corpus import tiny_pretrain_settings, write_synthetic_corpus, write_synthetic_tokenizer
from mrplip_core.model import load
from mrplip_core.train import PretrainConfig, load_config, pretrain
from mrplip_core.train.checkpoint import latest_checkpoint
from mrplip_core.train.schedule import warmup_cosine

REPO = Path(__file__).resolve().parents[1]
TERMS = ("itc", "itm", "mlm", "plm", "cvta", "mrtva")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    results = write_synthetic_corpus(root / "results", bags_per_slide=6)
    return results, write_synthetic_tokenizer(root / "tokenizer")


def config(corpus, **sections) -> PretrainConfig:
    results, tokenizer = corpus
    return PretrainConfig.from_dict(tiny_pretrain_settings(results, tokenizer, **sections))


def read_metrics(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_lowers_every_loss_term(corpus, tmp_path):
    steps, window = 120, 15
    summary = pretrain(config(corpus, train={"steps": steps}, optim={"lr": 1e-2}), tmp_path / "run")
    history = summary["history"]
    assert len(history) == steps and summary["finished"]
    for term in TERMS:
        values = np.array([row[term] for row in history])
        first, last = values[:window].mean(), values[-window:].mean()
        assert last < first - 0.05, f"{term}: first {first:.3f} -> last {last:.3f}"
    itm = np.mean([row["itm"] for row in history[-window:]])
    assert itm < 0.55, f"ITM {itm:.3f} did not get below its prior (0.637: always 'no match')"
    # the run is exported and the loader gives embeddings in which patches find their captions
    model = load(tmp_path / "run")
    assert model.embed_dim == 16 and model.magnifications == (5.0, 10.0, 20.0, 40.0)


def _checkpoint_tensors(path):
    weights = load_file(str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True)
    return weights, state


def _assert_same_state(a, b):
    wa, sa = a
    wb, sb = b
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    opt_a, opt_b = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for key in opt_a:
        for name in opt_a[key]:
            assert torch.equal(torch.as_tensor(opt_a[key][name]), torch.as_tensor(opt_b[key][name])), (key, name)
    assert sa["scheduler"] == sb["scheduler"] and sa["micro_batches"] == sb["micro_batches"]


def test_killed_run_resumes_bitwise(corpus, tmp_path):
    n, k = 8, 3
    train = {"steps": n, "accumulation_steps": 2, "save_every": 2}
    data = {"batch_size": 2}
    assert pretrain(config(corpus, train=train, data=data), tmp_path / "whole")["finished"]
    # "killed" after step k: the job stops there (its last checkpoint) ...
    part = pretrain(config(corpus, train={**train, "stop_at_step": k}, data=data), tmp_path / "resumed")
    assert part["end_step"] == k and not part["finished"]
    assert not (tmp_path / "resumed" / "model.safetensors").exists()  # no export before the end
    assert latest_checkpoint(tmp_path / "resumed").name == f"step_{k:08d}"
    # ... and a rerun resumes from it, with DataLoader workers this time (a resumable change)
    rest = pretrain(config(corpus, train=train, data={**data, "num_workers": 2}), tmp_path / "resumed")
    assert rest["start_step"] == k and rest["end_step"] == n
    _assert_same_state(_checkpoint_tensors(tmp_path / "whole" / "checkpoints" / f"step_{n:08d}"),
                       _checkpoint_tensors(tmp_path / "resumed" / "checkpoints" / f"step_{n:08d}"))
    final_a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    final_b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)
    # the metrics read like one run: same rows, same values
    rows_a, rows_b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in rows_b] == [str(s) for s in range(1, n + 1)]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    # RNG files and state load without unpickling; the resolved config sits beside them
    ckpt = tmp_path / "resumed" / "checkpoints" / f"step_{n:08d}"
    rng = torch.load(ckpt / "rng_rank0.pt", weights_only=True)
    assert rng["torch"].dtype == torch.uint8 and rng["python_state"].dtype == torch.int64
    saved = yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())["pretrain"]
    assert saved["train"]["steps"] == n and saved["loss"]["itc"]["local_loss"] is True
    # only the last keep_last checkpoints remain
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("step_*"))) == 3


def test_resume_refuses_a_changed_config(corpus, tmp_path):
    pretrain(config(corpus, train={"steps": 4, "stop_at_step": 2}), tmp_path / "run")
    with pytest.raises(ValueError, match="optim.lr"):
        pretrain(config(corpus, train={"steps": 4}, optim={"lr": 1e-3}), tmp_path / "run")
    fresh = pretrain(config(corpus, train={"steps": 2, "resume": "never"}, optim={"lr": 1e-3}), tmp_path / "run")
    assert fresh["start_step"] == 0


def test_ablations_are_config_changes(corpus, tmp_path):
    # single resolution (20x only), baseline terms only
    single = pretrain(config(corpus, data={"magnifications": [20.0], "patches_per_magnification": [6]},
                             loss={"weights": {"cvta": 0, "mrtva": 0}}, train={"steps": 3}), tmp_path / "single")
    row = single["history"][-1]
    assert {"itc", "itm", "mlm", "plm"} <= set(row) and "cvta" not in row and "mrtva" not in row
    assert load(tmp_path / "single").magnifications == (20.0,)
    # no 10x, contrastive and MRTVA only: 5x-20x pairs (nearest drawn ancestor)
    skip = pretrain(config(corpus, data={"magnifications": [5.0, 20.0, 40.0], "patches_per_magnification": [1, 2, 2]},
                           loss={"weights": {"itm": 0, "mlm": 0, "plm": 0}}, train={"steps": 3}), tmp_path / "skip")
    row = skip["history"][-1]
    assert row["mrtva/5x-20x"] == row["mrtva/5x-20x"] and row["mrtva/20x-40x"] == row["mrtva/20x-40x"]  # not NaN
    assert "mlm" not in row


def test_warmup_cosine_schedule():
    values = [warmup_cosine(s, 4, 20, 0.1) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0] and values[4] == 1.0
    assert all(a >= b for a, b in zip(values[4:], values[5:])) and abs(warmup_cosine(20, 4, 20, 0.1) - 0.1) < 1e-12


def test_config_resolution_and_errors(corpus, tmp_path):
    results, tokenizer = corpus
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"slides": "x.tsv", "pretrain": tiny_pretrain_settings(results, tokenizer)}))
    cfg = load_config(path, json.dumps({"train": {"steps": 7}}), ["loss.weights.plm=0", "data.magnifications=[5, 10]",
                                                                    "data.patches_per_magnification=[1, 3]"])
    assert cfg.train.steps == 7 and cfg.active_terms == {"itc", "itm", "mlm", "cvta", "mrtva"}
    assert cfg.data.magnifications == (5.0, 10.0) and cfg.keyword_top_k == 5
    with pytest.raises(ValueError, match=r"pretrain\.train.*stepz"):
        load_config(path, None, ["train.stepz=3"])
    with pytest.raises(ValueError, match="patches_per_magnification"):
        load_config(path, None, ["data.magnifications=[5]"])
    with pytest.raises(ValueError, match=r"pretrain\.loss\.weights.*'foo'"):
        load_config(path, None, ["loss.weights.foo=1"])


def test_cli_prints_and_rejects_configs(corpus, capsys):
    from mrplip_core.cli import main

    results, tokenizer = corpus
    settings = json.dumps({"pretrain": tiny_pretrain_settings(results, tokenizer)})
    assert main(["pretrain", "--settings", settings, "--set", "train.steps=5", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["pretrain"]["train"]["steps"] == 5
    assert main(["pretrain", "--settings", settings, "--set", "model.widht=3", "--print-config"]) == 2
    assert "widht" in capsys.readouterr().err


def test_validation_runs_on_held_out_slides(corpus, tmp_path):
    from mrplip_core.data import slide_split

    seed = next(s for s in range(100) if [slide_split(x, 0.34, s) for x in ("synth_a", "synth_b", "synth_c")].count("val") == 1)
    pretrain(config(corpus, data={"val_fraction": 0.34, "split_seed": seed},
                    train={"steps": 4, "val_every": 2, "val_batches": 2}), tmp_path / "run")
    index = pd.read_parquet(tmp_path / "run" / "bag_index.parquet")
    assert index.groupby("split")["slide_id"].nunique().to_dict() == {"train": 2, "val": 1}
    with open(tmp_path / "run" / "val_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4"] and all(float(r["loss"]) > 0 for r in rows)
    assert rows[0]["itc"] != rows[1]["itc"]  # same batches, trained weights
