"""Snakemake actually run on a small workdir: the tiles stage over real and synthetic slides."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir),
           "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def job_counts(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table."""
    text = proc.stdout + proc.stderr
    block = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    counts = {}
    for m in re.finditer(r"^(\w+)\s+(\d+)$", block, flags=re.M):
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def make_workdir(tmp: Path, rows: list[tuple[str, str, str]], **overrides) -> Path:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["slides"] = "slides.tsv"
    cfg["demo"] = [{"name": "synthetic_40x", "width": 8192, "height": 8192, "mpp": 0.25, "seed": 1}]
    cfg["tiling"]["min_tissue_fraction"] = 0.3
    cfg.update(overrides)
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = ["slide_id\tpath\tmpp"] + ["\t".join(r) for r in rows]
    (tmp / "slides.tsv").write_text("\n".join(lines) + "\n")
    return tmp


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, shared_data):
    s = shared_data / "slides"
    wd = make_workdir(
        tmp_path_factory.mktemp("wf"),
        [
            ("synthetic_40x", "demo/synthetic_40x.tiff", ""),
            ("CMU-1", str(s / "CMU-1-Small-Region.svs"), ""),
            ("TCGA-CR-7395", str(s / "TCGA-CR-7395-01A-01-TS1.svs"), "0.5"),
            ("TCGA-no-mpp", str(s / "TCGA-CR-7395-01A-01-TS1.svs"), ""),
            ("broken", str(s / "broken.svs"), ""),
            ("missing", "nowhere/ghost.svs", ""),
            ("CMU-dicom", str(s / "CMU-1-Small-Region-dicom"), ""),
        ],
    )
    first = snakemake(wd, "tiles")
    return wd, first


def test_bad_slides_are_recorded_and_the_rest_finish(tiled):
    wd, first = tiled
    slides = pd.read_parquet(wd / "results" / "slides.parquet").set_index("slide_id")
    status = slides.status.to_dict()
    assert status == {
        "synthetic_40x": "ok", "CMU-1": "ok", "TCGA-CR-7395": "ok", "TCGA-no-mpp": "failed",
        "broken": "failed", "missing": "failed", "CMU-dicom": "no_parents",
    }
    # the DICOM copy's colours decode wrongly (pink glass): its one parent box is barely "tissue"
    assert "holds 1 parent box" in slides.at["CMU-dicom", "reason"] and pd.isna(slides.at["CMU-dicom", "error"])
    assert "no microns-per-pixel" in slides.at["TCGA-no-mpp", "error"]
    assert "OpenSlide cannot open" in slides.at["broken", "error"]
    assert "file not found" in slides.at["missing", "error"]
    assert list(slides.at["CMU-1", "skipped_magnifications"]) == [40.0]
    assert slides.at["TCGA-CR-7395", "mpp_source"] == "table"
    # counts stay integers beside the failed rows' nulls
    assert {str(slides[c].dtype) for c in ("width", "height", "levels", "n_parents", "n_patches")} == {"Int64"}
    assert pd.isna(slides.at["broken", "n_parents"]) and slides.at["CMU-1", "n_parents"] == 1
    for sid in status:
        assert (wd / "results" / "tissue" / f"{sid}.png").exists()


def test_every_40x_parent_has_4_16_64_children_tiling_its_box(tiled):
    wd, _ = tiled
    df = pd.read_parquet(wd / "results" / "tiles" / "synthetic_40x.parquet")
    parents = df[df.magnification == 5.0]
    assert len(parents) >= 1
    for _, p in parents.iterrows():
        bag = df[df.bag_id == p.patch_id]
        for mag, n in ((10.0, 4), (20.0, 16), (40.0, 64)):
            kids = bag[bag.magnification == mag]
            assert len(kids) == n
            # exact tiling: same total area, every child inside the parent, no two alike
            assert (kids["size"] ** 2).sum() == p["size"] ** 2
            assert ((kids.x >= p.x) & (kids.x + kids["size"] <= p.x + p["size"])).all()
            assert ((kids.y >= p.y) & (kids.y + kids["size"] <= p.y + p["size"])).all()
            assert not kids[["x", "y"]].duplicated().any()


def test_rerun_does_nothing_and_a_deleted_manifest_rebuilds_only_that_slide(tiled):
    wd, _ = tiled
    again = snakemake(wd, "tiles")
    assert "Nothing to be done" in again.stdout + again.stderr
    before = pd.read_parquet(wd / "results" / "tiles" / "synthetic_40x.parquet")
    (wd / "results" / "tiles" / "CMU-1.parquet").unlink()
    rebuilt = snakemake(wd, "tiles")
    assert job_counts(rebuilt) == {"tiles_slide": 1, "slides_table": 1, "tiles": 1}
    assert "CMU-1" in rebuilt.stdout + rebuilt.stderr
    assert (wd / "results" / "tiles" / "CMU-1.parquet").exists()
    pd.testing.assert_frame_equal(before, pd.read_parquet(wd / "results" / "tiles" / "synthetic_40x.parquet"))


def test_failures_fatal_makes_the_run_fail(tmp_path, shared_data):
    wd = make_workdir(tmp_path, [("broken", str(shared_data / "slides" / "broken.svs"), "")], failures_fatal=True)
    proc = snakemake(wd, "tiles", check=False)
    assert proc.returncode != 0
    log = (wd / "logs" / "tiles" / "broken.log").read_text()
    assert "broken" in log and "OpenSlide cannot open" in log


def test_a_slide_without_parents_is_recorded_not_fatal(tmp_path, shared_data):
    wd = make_workdir(tmp_path, [("CMU-1", str(shared_data / "slides" / "CMU-1-Small-Region.svs"), "")],
                      failures_fatal=True)
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["tiling"]["min_tissue_fraction"] = 0.5  # the default: CMU-1's one parent box is 35 % tissue
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd, "tiles")
    slides = pd.read_parquet(wd / "results" / "slides.parquet")
    assert slides.status.tolist() == ["no_parents"] and "best has 0.35" in slides.reason[0]
    assert "NO PARENTS CMU-1: slide 'CMU-1': no 5x parent" in (wd / "logs" / "slides_table.log").read_text()


def test_invalid_config_fails_before_any_job_naming_the_key(tmp_path):
    wd = make_workdir(tmp_path, [("synthetic_40x", "demo/synthetic_40x.tiff", "")])
    proc = snakemake(wd, "tiles", "--config", "n_parent=3", check=False)
    assert proc.returncode != 0 and "n_parent" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling:\n  selection: best\n")
    proc = snakemake(wd, "tiles", "--configfile", str(wd / "config.yaml"), str(bad), check=False)
    assert proc.returncode != 0 and "selection" in proc.stderr and "best" in proc.stderr
    assert not (wd / "results").exists()


def test_slide_table_errors_name_the_row(tmp_path):
    wd = make_workdir(tmp_path, [("bad id!", "x.svs", "")])
    proc = snakemake(wd, "tiles", check=False)
    assert proc.returncode != 0 and "bad id!" in proc.stderr and "slides.tsv" in proc.stderr


def test_default_run_plans_every_stage_through_the_report_from_any_workdir(tmp_path):
    """`snakemake` with the shipped config, run with -d elsewhere: every stage down to the HTML
    report is planned, and the shipped zero-shot prompt files are found in the repository."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "slides.tsv").write_text((REPO / "demo" / "slides.tsv").read_text())
    proc = snakemake(tmp_path, "-n")
    counts = job_counts(proc)
    n_slides = 2
    for rule in ("demo_slide", "tiles_slide", "captions_slide", "keywords_slide", "features_slide",
                 "text_features_slide"):
        assert counts.get(rule) == n_slides, (rule, counts)
    for rule in ("slides_table", "pretrain", "pretrain_ablation", "eval_summary", "html_report", "all"):
        assert counts.get(rule) == 1, (rule, counts)
    # frozen baseline, the pretrain run and its ablation (config `ablations`), on each of the
    # two configured tile sets; retrieval for both runs
    assert counts.get("eval_dataset") == 6, counts
    assert counts.get("eval_retrieval") == 2, counts
    assert str(REPO / "evaluation" / "prompts" / "nct_crc.json") in proc.stdout
