"""The HTML report, built from a small results tree made in tmp: real tiles of a synthetic slide
(tissue QC PNG, manifest, patches read back from the slide), captions and keywords, a pretrain
run's metrics.csv, tile-classification and retrieval metrics.json. Checks that every section is
there, that every picture the page shows exists beside it, and that missing or broken inputs are
reported in the page instead of stopping it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mrplip_core.evaluation.datasets import TileDataset
from mrplip_core.evaluation.prompts import PromptSet
from mrplip_core.io.atomic import TEMP_NAME
from mrplip_core.evaluation.run import evaluate_dataset, run_retrieval, write_summary
from mrplip_core.evaluation.settings import DatasetSpec, EvaluationSettings
from mrplip_core.testing.known_answers import MeanColourEmbedder, colour_prompts, write_colour_tiles
from mrplip_core.report import SECTIONS, build_report
from mrplip_core.wsi.records import collect_slide_records
from mrplip_core.wsi.synthetic import write_synthetic_slide
from mrplip_core.wsi.tiling import TilesOutputs, TilesSettings, tile_slide

SLIDES = ("synth_a", "synth_b")
TILING = {"tiling": {"magnifications": [5, 10, 20], "patch_px": 128, "n_parents": 2, "selection": "most_tissue"}}
COLOURS = ("red", "green", "blue")
SETTINGS = EvaluationSettings.from_dict({
    "linear_probe": {"c_grid": [1.0]}, "few_shot": {"shots": [1], "seeds": [0, 1]},
    "retrieval": {"split": "all", "max_pairs": 50},
    "report": {"sample_bags": 3, "thumbnail_px": 96},
})


def write_metrics_csv(run_dir: Path, terms: list[str]) -> None:
    steps = np.arange(10, 110, 10)
    rows = {"step": steps, "epoch": steps // 50, "lr": np.minimum(1.0, steps / 30) * 1e-4}
    for i, t in enumerate(terms):
        rows[t] = (i + 1) * np.exp(-steps / 50)
    rows["loss"] = sum(rows[t] for t in terms)
    rows["mrtva/5x-10x"] = -0.5 - 0.4 * (1 - np.exp(-steps / 40))
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("report")
    res = base / "results"
    table = []
    for i, sid in enumerate(SLIDES):
        path = base / f"{sid}.tiff"
        write_synthetic_slide(path, 3072, 2048, 0.5, seed=i + 1)
        tile_slide(sid, path, TilesOutputs(res / "tiles" / f"{sid}.parquet", res / "tissue" / f"{sid}.geojson",
                                           res / "tissue" / f"{sid}.png", res / "slides" / f"{sid}.json"),
                   TilesSettings.from_dict(TILING))
        table.append((sid, str(path)))
        man = pd.read_parquet(res / "tiles" / f"{sid}.parquet")
        (res / "captions").mkdir(exist_ok=True)
        pd.DataFrame({"patch_id": man["patch_id"], "prompt": "describe", "model": "test", "backend": "test",
                      "params": "{}", "error": None,
                      "caption": [f"{m:g}x patch {j}: purple nuclei in red stroma" for j, m in enumerate(man["magnification"])]}
                     ).to_parquet(res / "captions" / f"{sid}.parquet", index=False)
        (res / "keywords").mkdir(exist_ok=True)
        pd.DataFrame([(b, k, list(man.loc[man["bag_id"] == b, "patch_id"])[:n]) for b in man["bag_id"].unique()
                      for k, n in (("purple nuclei", 4), ("red stroma", 2))],
                     columns=["bag_id", "keyword", "patch_ids"]).to_parquet(res / "keywords" / f"{sid}.parquet", index=False)
    pd.DataFrame(table, columns=["slide_id", "path"]).to_csv(base / "slides.tsv", sep="\t", index=False)
    collect_slide_records(base / "slides.tsv", res / "slides", res / "slides.parquet")

    run = res / "pretrain" / "demo-run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"pretrain": {
        "data": {"image_encoder": "tiny-vit-random", "magnifications": [5.0, 10.0, 20.0]},
        "loss": {"weights": {"mrtva": 0.0}}, "train": {"steps": 100}}}))
    write_metrics_csv(run, ["itc", "itm", "mlm", "plm", "cvta"])

    tiles = write_colour_tiles(base / "colours", COLOURS, per_class=4, px=16)
    spec = DatasetSpec(name="colours", path=str(tiles / "labels.csv"), mpp=0.5, title="solid colours",
                       citation="made by the test")
    for name, with_text in (("frozen-colour", False), ("demo-run", True)):
        emb = MeanColourEmbedder(name, with_text=with_text)
        evaluate_dataset(emb, TileDataset.load(spec), SETTINGS, res / "eval" / name / "colours",
                         prompts=PromptSet.from_dict(colour_prompts(COLOURS)), spec=spec)
    run_retrieval(MeanColourEmbedder("demo-run"), res, SETTINGS, res / "eval" / "demo-run" / "retrieval")
    write_summary(sorted(res.glob("eval/*/*/metrics.json")), res / "eval" / "summary.csv")
    return res


def images_of(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_report_has_every_section_and_every_image_exists(results: Path) -> None:
    page = build_report(results, results / "report", settings=SETTINGS.report, datasets=(), runs=None)
    html = page.read_text()
    for anchor, _, _ in SECTIONS:
        assert f'<section id="{anchor}">' in html
    assert 'class="error"' not in html
    before, pathflip_section = html.split('<section id="pathflip">')
    assert 'class="missing"' not in before  # this fixture has no PathFLIP run: test_report_pathflip.py
    assert "no finished PathFLIP run" in pathflip_section
    srcs = images_of(html)
    assert all((page.parent / s).is_file() and not Path(s).is_absolute() for s in srcs)
    assert sum(s.startswith("img/qc_") for s in srcs) == len(SLIDES)
    assert sum(s.startswith("img/patch_") for s in srcs) == 3 * 3  # 3 bags x (5x, 10x, 20x)
    assert "img/loss_demo-run.png" in srcs
    assert "<td>3 results</td>" in html  # the overview counts every metrics.json below eval/
    assert sum(s.startswith("img/cm_") for s in srcs) == 3  # baseline: probe; run: zero-shot + probe
    assert "purple nuclei in red stroma" in html and "bag keywords: purple nuclei, red stroma" in html
    assert "CVTA on · MRTVA off" in html and "ITC + ITM + MLM + PLM + CVTA" in html
    summary = pd.read_csv(results / "eval" / "summary.csv")
    probe = summary[(summary["model"] == "demo-run") & (summary["task"] == "linear_probe")].iloc[0]
    assert f"{probe['weighted_f1']:.3f}" in html
    metrics = json.loads((results / "eval" / "demo-run" / "retrieval" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and "INCLUDING" in metrics["split_note"] and "INCLUDING" in html


def test_report_of_an_empty_results_folder_says_what_is_missing(tmp_path: Path) -> None:
    page = build_report(tmp_path / "results", tmp_path / "report")
    html = page.read_text()
    assert 'class="error"' not in html
    for stage in ("snakemake tiles", "snakemake captions", "snakemake pretrain", "snakemake evaluate"):
        assert stage in html
    assert html.count('class="missing"') >= 4 and images_of(html) == []


def test_a_broken_input_breaks_only_its_section(results: Path, tmp_path: Path) -> None:
    broken = tmp_path / "results"
    broken.mkdir()
    for name in ("tiles", "tissue", "captions", "keywords", "slides", "pretrain", "eval"):
        (broken / name).symlink_to(results / name)
    (broken / "slides.parquet").write_bytes(b"not a parquet file")
    html = build_report(broken, tmp_path / "report").read_text()
    assert html.count('class="error"') == 1 and "could not be built" in html
    assert "purple nuclei in red stroma" in html and "img/loss_demo-run.png" in html


def test_the_report_verb_takes_the_rules_command_line(results: Path, tmp_path: Path, capsys) -> None:
    from mrplip_core.cli import main

    settings = json.dumps({"evaluation": {"report": {"sample_bags": 1, "thumbnail_px": 96}}, "features": {}})
    out = tmp_path / "report"
    assert main(["report", "--results", str(results), "--out", str(out), "--runs", "demo-run", "--baselines", "",
                 "--settings", settings]) == 0
    html = (out / "index.html").read_text()
    assert "img/loss_demo-run.png" in html and f"report -> {out / 'index.html'}" in capsys.readouterr().out


def test_a_run_is_described_with_its_cvta_and_mrtva_forms() -> None:
    """An ablation that only changes the objective's form reads differently from the main run."""
    from mrplip_core.report.evaluation import describe_model

    base = {"kind": "mrplip", "image_encoder": "uni", "magnifications": [5.0, 10.0], "multi_resolution": True,
            "cvta": True, "mrtva": True, "steps": 10}
    paper = describe_model({**base, "cvta_denominator": "all_keywords", "mrtva_pairs": "lineage"})
    earlier = describe_model({**base, "cvta_denominator": "negatives_only", "mrtva_pairs": "adjacent"})
    assert "CVTA (all_keywords) · MRTVA (lineage pairs)" in paper
    assert "CVTA (negatives_only) · MRTVA (adjacent pairs)" in earlier


def test_a_rerun_after_a_killed_report_leaves_no_temporary_picture(tmp_path: Path) -> None:
    """A report job killed while writing a picture left `.loss_demo.png.k77hgper.tmp.png`; the rerun removes it."""
    from mrplip_core.io.atomic import atomic_path

    out = tmp_path / "report"
    (out / "img").mkdir(parents=True)
    stale = out / "img" / ".loss_demo.png.k77hgper.tmp.png"
    stale.write_bytes(b"half a png")
    keep = out / "img" / "notes.tmp.txt"  # not a name atomic_path gives
    keep.write_text("x")
    with atomic_path(out / "img" / "a.png") as tmp:  # the names it gives are the ones removed
        assert TEMP_NAME.match(tmp.name)
        tmp.write_bytes(b"png")
    build_report(tmp_path / "results", out)
    assert not stale.exists() and keep.exists() and (out / "img" / "a.png").exists()
