"""The MR-PLIP ablation from pixels: full MR-PLIP, 20x only, no MRTVA, no CVTA and the frozen
encoder, 3 seeds each, through the real pipeline on a planted cohort, scored on held-out slides.

    .venv/bin/python bench/ablation.py --workdir /tmp/ablation
    .venv/bin/python bench/ablation.py --workdir /tmp/ablation-tissue --palette tissue

1. ``write_planted_cohort`` writes the pretraining cohort (``--slides`` slides of 2-3 kinds
   each, ``wsi/planted.py``) into ``--workdir``, and a second cohort of ``--heldout`` slides
   (another seed: other layouts and pixels) into ``--workdir/heldout``. ``--palette``:
   ``architecture`` (default; scanned at 40x, 0.25 um/px, 3.1 mm): glands in stroma or solid
   sheets, which differ at 5x, crossed with low- or high-grade nuclei, which differ from 20x
   on and not in colour at 5x; ``tissue`` (20x, 0.5 um/px, 4.1 mm): five kinds that differ in
   colour, texture and nuclei at every magnification. The held-out slides never enter the
   workflow: ``wsi.region_tiles.write_tile_set`` cuts labelled 20x tiles (512 px, the
   pipeline's patch size, at 0.5 um/px) from their regions, the kind covering at least 90% of a
   tile being its label, at most ``--tiles-per-kind`` per kind and slide.
2. The workflow config is the cohort's (``pathflip/planted.py``: 5/10/20(/40)x tiles, the
   morphology captioner, the demo's random tiny ViT features) with ``bench/ablation.yaml``
   merged in (the rows x seeds as ablation runs; a quarter of the slides held out of
   pretraining; the 20x-only rows get as many patches per bag as the full run) and the bench's
   settings: ``--steps`` steps of a small random text encoder (the rows differ only in what the
   yaml changes), the held-out tile set with the palette's prompts
   (``bench/ablation_prompts*.json``) as the evaluation's tile set, PathFLIP and the slide
   level off.
3. ``snakemake ... results/eval/summary.csv`` runs tiles, captions, keywords, features, the 12
   pretraining runs and their evaluation. The table: per row, mean +- sd over the seeds of
   patch<->caption retrieval R@1 (both directions) on the slides the runs held out, and
   zero-shot, linear-probe and 1- and 4-shot probe weighted F1 on the held-out tiles (a k-shot
   figure is itself the mean over 10 draws of the k tiles per class). The frozen encoder has
   no text side (zero-shot and retrieval n/a) and no seed (its probes are one figure each).
   A second table splits image->text R@1 by magnification: each magnification's pairs on their
   own (the first table's retrieval pools every magnification in one gallery).

Prints the table and writes ``bench_ablation.json`` in the workdir. Nothing is tuned to an
ordering of the rows: the cohorts, prompts and settings were fixed before their first run, and
whatever comes out is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mrplip_core.layout import Layout  # noqa: E402
from mrplip_core.pathflip.planted import CohortFiles, cohort_config, write_planted_cohort  # noqa: E402
from mrplip_core.wsi.planted import PALETTES, SCAN_MPP  # noqa: E402
from mrplip_core.wsi.region_tiles import write_tile_set  # noqa: E402
from mrplip_core.wsi.slide import Slide  # noqa: E402

ROWS = ("full", "single-20x", "no-mrtva", "no-cvta")
TILE_MAGNIFICATION, TILE_PX = 20.0, 512
SHOTS = (1, 4)


@dataclass(frozen=True)
class Cohort:
    """How the bench scans a palette's slides and which zero-shot prompts it uses."""

    mpp: float  # level-0 um/px
    size_mm: float  # side of each square slide
    prompts: str  # file under bench/
    title: str


COHORTS = {
    "architecture": Cohort(SCAN_MPP["architecture"], 3.1, "ablation_prompts_architecture.json",
                           "Planted architecture x grade, held-out slides (20x tiles)"),
    "tissue": Cohort(SCAN_MPP["tissue"], 4.1, "ablation_prompts.json", "Planted kinds, held-out slides (20x tiles)"),
}


def bench_config(workdir: Path, steps: int, cohort: Cohort) -> dict:
    """The cohort's config, ``bench/ablation.yaml`` merged in, and the bench's own settings."""
    base = yaml.safe_load(CohortFiles(workdir).config.read_text())
    ablation = yaml.safe_load((REPO / "bench" / "ablation.yaml").read_text())
    cfg = cohort_config(base, {"ablations": {}})  # the yaml's rows, not the demo's
    cfg = cohort_config(cfg, ablation)
    per_bag = sum(cfg["pretrain"]["data"]["patches_per_magnification"])
    for row in cfg["ablations"].values():  # one magnification: as many patches per bag as the full run
        if len(row.get("data", {}).get("magnifications", ())) == 1:
            row["data"]["patches_per_magnification"] = [per_bag]
    return cohort_config(cfg, {
        "pretrain": {
            "model": {"text_encoder": "random", "text_config": {
                "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                "max_position_embeddings": 128}, "embed_dim": 128, "fusion_layers": 1, "keyword_fusion_layers": 1,
                "decoder_layers": 1},
            "data": {"batch_size": 8, "num_workers": 0},
            "optim": {"lr": 5.0e-4, "warmup_steps": 10},
            "train": {"steps": steps},
        },
        "evaluation": {
            "datasets": {"heldout": {
                "path": "heldout/tiles/labels.csv", "mpp": 10.0 / TILE_MAGNIFICATION, "magnification": TILE_MAGNIFICATION,
                "prompts": str(REPO / "bench" / cohort.prompts), "optional": False,
                "title": cohort.title, "citation": "synthetic (wsi/planted.py)"}},
            "few_shot": {"enabled": True, "shots": list(SHOTS), "seeds": list(range(10))},
            "slides": {"enabled": False},
            "retrieval": {"max_pairs": 1000},
        },
    })


def check_reused(table: Path, palette: str) -> None:
    """Stop when a workdir's existing cohort is not ``palette``'s (its kinds or its um/px): a rerun
    with another --palette in the same --workdir would otherwise score one palette's slides with the
    other's prompts."""
    tab = pd.read_csv(table, sep="\t")
    kinds = {k for ks in tab["kinds"].dropna() for k in str(ks).split(",")}
    mpps = sorted(set(tab["mpp"].astype(float)))
    if not kinds <= set(PALETTES[palette]) or mpps != [COHORTS[palette].mpp]:
        raise SystemExit(f"{table}: this cohort ({sorted(kinds)} at {mpps} um/px) is not the {palette} palette's "
                         f"({sorted(PALETTES[palette])} at {COHORTS[palette].mpp} um/px); give another --workdir "
                         f"or the --palette it was made with")


def prepare(workdir: Path, palette: str, slides: int, heldout: int, tiles_per_kind: int, seed: int,
            steps: int) -> pd.DataFrame:
    """Both cohorts, the held-out tile set and the workflow config; returns the tile table. A
    cohort already in ``workdir`` is reused when it is ``palette``'s (else it stops)."""
    cohort = COHORTS[palette]
    scan = {"size_mm": cohort.size_mm, "mpp": cohort.mpp, "palette": palette}
    held = CohortFiles(workdir / "heldout")
    for files, n, s in ((CohortFiles(workdir), slides, seed), (held, heldout, seed + 1)):
        if files.table.exists():
            check_reused(files.table, palette)
        else:
            write_planted_cohort(files.root, n, s, **scan)
    labels = held.root / "tiles" / "labels.csv"
    if not labels.exists():
        tab = pd.read_csv(held.table, sep="\t")
        pairs = [(Slide(held.root / p, s, mpp=float(m)), held.root / r)
                 for s, p, m, r in zip(tab["slide_id"], tab["path"], tab["mpp"], tab["regions"])]
        write_tile_set(pairs, labels.parent, magnification=TILE_MAGNIFICATION, tile_px=TILE_PX,
                       per_kind=tiles_per_kind, seed=seed)
    cfg = bench_config(workdir, steps, cohort)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return pd.read_csv(labels)


def run_workflow(workdir: Path, cores: int) -> None:
    target = Layout(workdir / "results").eval_summary.relative_to(workdir)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir),
           "--cores", str(cores), "-q", "--", str(target)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _value(summary: pd.DataFrame, model: str, dataset: str, task: str, column: str) -> float | None:
    row = summary[(summary["model"] == model) & (summary["dataset"] == dataset) & (summary["task"] == task)]
    if row.empty or row.iloc[0]["status"] != "ok":
        return None
    return float(row.iloc[0][column])


METRICS = {  # column of the table -> (dataset, task, summary column)
    "retrieval i2t R@1": ("retrieval", "retrieval image_to_text R@1", "recall"),
    "retrieval t2i R@1": ("retrieval", "retrieval text_to_image R@1", "recall"),
    "zero-shot wF1": ("heldout", "zero_shot", "weighted_f1"),
    "linear probe wF1": ("heldout", "linear_probe", "weighted_f1"),
    **{f"{k}-shot wF1": ("heldout", f"{k}-shot", "weighted_f1") for k in SHOTS},
}


def table(summary: pd.DataFrame, seeds: list[int], frozen: str) -> pd.DataFrame:
    """Rows x metrics, ``mean +- sd`` over seeds (n/a where the model has no such figure)."""
    out = []
    for row in (*ROWS, "frozen encoder"):
        models = [frozen] if row == "frozen encoder" else [f"{row}-s{s}" for s in seeds]
        cells = {"row": row, "runs": len(models)}
        for name, (dataset, task, column) in METRICS.items():
            vals = [v for m in models if (v := _value(summary, m, dataset, task, column)) is not None]
            cells[name] = ("n/a" if not vals else f"{statistics.mean(vals):.3f}" if len(vals) == 1 else
                           f"{statistics.mean(vals):.3f} +- {statistics.stdev(vals):.3f}")
            cells[f"{name} (values)"] = [round(v, 4) for v in vals]
        out.append(cells)
    return pd.DataFrame(out)


def retrieval_by_magnification(layout: Layout, seeds: list[int]) -> pd.DataFrame:
    """Rows x magnification: image->text R@1 within the pairs of one magnification, ``mean +- sd``
    over seeds (the table's retrieval columns pool every magnification in one gallery)."""
    out = []
    for row in ROWS:
        per_mag: dict[str, list[float]] = {}
        for s in seeds:
            path = layout.retrieval_metrics(f"{row}-s{s}")
            if not path.exists():
                continue
            for mag, m in json.loads(path.read_text()).get("by_magnification", {}).items():
                per_mag.setdefault(mag, []).append(float(m["image_to_text"]["R@1"]))
        out.append({"row": row, **{mag: f"{statistics.mean(v):.3f}" + (f" +- {statistics.stdev(v):.3f}" if len(v) > 1 else "")
                                   for mag, v in per_mag.items()}})
    return pd.DataFrame(out).fillna("n/a")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--palette", choices=sorted(COHORTS), default="architecture", help="the planted kinds")
    ap.add_argument("--slides", type=int, default=16, help="pretraining cohort (a quarter held out of pretraining)")
    ap.add_argument("--heldout", type=int, default=6, help="slides the labelled tiles are cut from")
    ap.add_argument("--tiles-per-kind", type=int, default=12, help="per held-out slide and kind")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of every run")
    ap.add_argument("--seed", type=int, default=0, help="cohort seed (the held-out cohort uses seed + 1)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tiles = prepare(a.workdir, a.palette, a.slides, a.heldout, a.tiles_per_kind, a.seed, a.steps)
    print(f"held-out tiles: {len(tiles)} from {tiles['slide_id'].nunique()} slides; per kind "
          + ", ".join(f"{k} {n}" for k, n in tiles["label"].value_counts().sort_index().items()), flush=True)
    run_workflow(a.workdir, a.cores)
    wall = time.perf_counter() - t0
    summary = pd.read_csv(Layout(a.workdir / "results").eval_summary)
    cfg = yaml.safe_load((a.workdir / "config.yaml").read_text())
    seeds = sorted({int(cfg["pretrain"]["seed"]), *(int(v.get("seed", cfg["pretrain"]["seed"])) for v in cfg["ablations"].values())})
    frozen = f"frozen-{cfg['features']['image_encoder']}"
    t = table(summary, seeds, frozen)
    shown = ["row", "runs", *METRICS]
    print(t[shown].to_string(index=False))
    print("retrieval i2t R@1 within one magnification:")
    print(retrieval_by_magnification(Layout(a.workdir / "results"), seeds).to_string(index=False))
    print(f"wall {wall / 60:.1f} min ({a.cores} cores), {a.steps} steps per run, {len(seeds)} seeds")
    (a.workdir / "bench_ablation.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(a).items()}, "wall_s": round(wall, 1), "seeds": seeds,
        "heldout_tiles": int(len(tiles)), "table": t.to_dict(orient="records")}, indent=2))


if __name__ == "__main__":
    main()
