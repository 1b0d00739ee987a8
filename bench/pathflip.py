"""PathFLIP on the planted-signal cohort, through the real pipeline: localisation of each held-out
sub-caption and caption-to-slide retrieval, untrained vs trained, one vs several magnifications.

    .venv/bin/python bench/pathflip.py --workdir /tmp/planted --slides 24
    .venv/bin/python bench/pathflip.py --workdir /tmp/planted --steps 300 --text-encoder minilm

1. ``mrplip planted-cohort`` writes the cohort into ``--workdir`` (unless it is there): slides whose
   regions are different tissue kinds, captions with one sentence per kind, each kind's region
   as GeoJSON (level-0 px).
2. Snakemake runs the real stages on it: tiles, image features with the demo encoder
   (``tiny-vit-random``), sub-captions (the rule-based splitter).
3. PathFLIP trains from those artifacts (``pathflip.data.val_fraction`` of the slides held out),
   as the ``pathflip`` rule does, for each form: untrained (one step at lr ~0), trained at 20x
   (the published single-magnification form), trained at 5x+10x+20x (magnification embedding).
4. On the held-out slides: each sub-caption's heatmap over the slide's patches against the
   patches of its kind's region (``wsi.regions.patch_truth``: the kind covering most of the
   patch): AUROC (mean over sub-captions) and pointing accuracy (the top patch inside), with
   their chance levels; caption-to-slide R@1 and R@5 with chance.

Prints one table and writes ``bench_pathflip.json`` in the workdir. Times are wall-clock on
this machine; nothing is asserted here (tests/test_pathflip_model.py holds the small version).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mrplip_core.evaluation.metrics import caption_slide_retrieval, localization_metrics  # noqa: E402
from mrplip_core.layout import Layout  # noqa: E402
from mrplip_core.pathflip_model import load_pathflip  # noqa: E402
from mrplip_core.train.pathflip import train_pathflip  # noqa: E402
from mrplip_core.train.pathflip_config import PathflipTrainConfig  # noqa: E402
from mrplip_core.use.patches import read_slide_patches  # noqa: E402
from mrplip_core.wsi.regions import patch_truth, read_regions  # noqa: E402

ENCODER = "tiny-vit-random"


def run(cmd: list[str], cwd: Path | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})


def prepare(workdir: Path, slides: int, seed: int, cores: int) -> float:
    """Cohort + tiles + image features + sub-captions; returns the seconds it took."""
    t0 = time.perf_counter()
    if not (workdir / "slides.tsv").exists():
        run([sys.executable, "-m", "mrplip_core", "planted-cohort", "--out", str(workdir), "--slides", str(slides),
             "--seed", str(seed)])
    ids = pd.read_csv(workdir / "slides.tsv", sep="\t")["slide_id"].astype(str).tolist()
    targets = ["tiles", "subcaptions", *[f"results/features/{ENCODER}/{s}.h5" for s in ids]]
    run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir),
         "--cores", str(cores), "-q", "--", *targets])
    return time.perf_counter() - t0


def settings(results: Path, run: str, magnifications: list[float], steps: int, text_encoder: str, seed: int,
             lr: float) -> dict:
    text = ({"text_encoder": "minilm"} if text_encoder == "minilm" else
            {"text_encoder": "random", "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                                       "intermediate_size": 128, "max_position_embeddings": 128}})
    return {"run": run, "seed": seed,
            "data": {"results": str(results), "image_encoder": ENCODER, "magnifications": magnifications,
                     "patches_per_slide": 256, "subcaptions_per_slide": 8, "max_caption_tokens": 128,
                     "max_subcaption_tokens": 48, "val_fraction": 0.25, "batch_size": 6},
            "model": {**text, "embed_dim": 128, "width": 128, "heads": 4, "latents": 8, "slide_layers": 1, "topk": 16},
            "loss": {"region": {"init_bias": -2.0}},
            "optim": {"lr": lr, "warmup_steps": 10, "min_lr_ratio": 0.1},
            "train": {"steps": steps, "log_every": 10, "save_every": 100000, "tensorboard": False, "resume": "never"}}


def measure(run_dir: Path, workdir: Path, results: Path) -> dict:
    """Localisation and retrieval of one trained run on its held-out slides."""
    model = load_pathflip(run_dir)
    index = pd.read_parquet(run_dir / "slides.parquet")
    held = index[(index["status"] == "ok") & (index["split"] == "val")]["slide_id"].astype(str).tolist()
    truth = pd.read_parquet(workdir / "truth.parquet").set_index("subcaption_id")["kind"]
    table = pd.read_csv(workdir / "slides.tsv", sep="\t").set_index("slide_id")
    queries, slide_emb, captions = [], [], []
    for slide in held:
        patches = read_slide_patches(results, ENCODER, slide, model.magnifications)
        boxes = np.stack([patches.x, patches.y, patches.size], axis=1)
        kinds = patch_truth(boxes, read_regions(workdir / table.loc[slide, "regions"]))["kind"].to_numpy()
        subs = pd.read_parquet(Layout(results).subcaptions(slide))
        heat = model.localize(patches.features, patches.magnification, subs["text"].astype(str).tolist()).numpy()
        for q, sub_id in enumerate(subs["subcaption_id"].astype(str)):
            queries.append((heat[q], kinds == truth[sub_id]))
        slide_emb.append(model.encode_slide(patches.features, patches.magnification).numpy())
        captions.append(str(table.loc[slide, "caption"]))
    sim = model.encode_text(captions).numpy() @ np.stack(slide_emb).T
    return {"held_out_slides": len(held), **localization_metrics(queries),
            "retrieval": caption_slide_retrieval(sim, ks=(1, 5))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/planted"))
    ap.add_argument("--slides", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0, help="the cohort's seed")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--text-encoder", choices=["minilm", "random"], default="minilm",
                    help="minilm: the pipeline's default (bundled all-MiniLM-L6-v2); random: a 2-layer BERT")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--multi", default="5,10,20", help="magnifications of the multi-magnification form")
    a = ap.parse_args()
    workdir = a.workdir.resolve()
    results = workdir / "results"
    prep_s = prepare(workdir, a.slides, a.seed, a.cores)
    forms = {"untrained (20x)": ([20.0], 1, 1e-12), "trained 20x": ([20.0], a.steps, a.lr),
             f"trained {a.multi.replace(',', '+')}x": ([float(m) for m in a.multi.split(",")], a.steps, a.lr)}
    rows = {}
    for i, (name, (mags, steps, lr)) in enumerate(forms.items()):
        run_dir = results / "pathflip" / f"bench{i}"
        t0 = time.perf_counter()
        cfg = PathflipTrainConfig.from_dict(settings(results, f"bench{i}", mags, steps, a.text_encoder, a.train_seed, lr))
        summary = train_pathflip(cfg, run_dir)
        train_s = time.perf_counter() - t0
        rows[name] = {**measure(run_dir, workdir, results), "train_s": round(train_s, 1), "steps": steps,
                      "final_loss": summary["history"][-1]["loss"] if summary["history"] else None}
        print(name, json.dumps(rows[name], default=float), flush=True)
    print(f"\nPathFLIP on the planted cohort ({a.slides} slides, {ENCODER} features, text encoder {a.text_encoder}, "
          f"{a.steps} steps; data prepared in {prep_s:.0f} s)")
    print(f"{'form':<24} {'AUROC':>6} {'chance':>6} {'pointing':>8} {'chance':>6} {'R@1':>5} {'chance':>6} "
          f"{'R@5':>5} {'chance':>6} {'held-out':>8} {'train s':>8}")
    for name, r in rows.items():
        ret = r["retrieval"]
        print(f"{name:<24} {r['auroc']:6.3f} {r['auroc_chance']:6.2f} {r['pointing']:8.3f} {r['pointing_chance']:6.3f} "
              f"{ret['R@1']:5.2f} {ret['R@1_chance']:6.2f} {ret['R@5']:5.2f} {ret['R@5_chance']:6.2f} "
              f"{r['held_out_slides']:8d} {r['train_s']:8.1f}")
    (workdir / "bench_pathflip.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                             "prepare_s": prep_s, "rows": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
