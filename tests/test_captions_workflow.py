"""`snakemake captions` on a real slide: default offline run, rerun triggers, sharding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def snakemake(wd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"),
                           "--configfile", "config.yaml", "--cores", "2", *args],
                          cwd=wd, capture_output=True, text=True)


@pytest.fixture
def workdir(shared_data, tmp_path):
    slides = shared_data / "slides"
    (tmp_path / "slides.tsv").write_text(
        "slide_id\tpath\tmpp\n"
        f"CMU1\t{slides / 'CMU-1-Small-Region.svs'}\t\n"
        f"TCGA1\t{slides / 'TCGA-CR-7395-01A-01-TS1.svs'}\t0.5\n"
        f"BROKEN\t{slides / 'broken.svs'}\t\n")
    cfg = {"slides": "slides.tsv",
           "tiling": {"magnifications": [5, 10, 20], "patch_px": 256, "n_parents": 1, "selection": "most_tissue"},
           "captions": {"io_threads": 2}}
    (tmp_path / "config.yaml").write_text(json.dumps(cfg))
    return tmp_path


def test_default_offline_run_captions_every_patch_and_builds_textual_bags(workdir):
    p = snakemake(workdir, "captions")
    assert p.returncode == 0, p.stderr[-3000:]
    for sid in ("CMU1", "TCGA1"):
        tiles = pd.read_parquet(workdir / "results" / "tiles" / f"{sid}.parquet")
        caps = pd.read_parquet(workdir / "results" / "captions" / f"{sid}.parquet")
        assert len(tiles) == 21 and list(caps.patch_id) == list(tiles.patch_id)
        assert (caps.backend == "morphology").all() and caps.error.isna().all()
        kw = pd.read_parquet(workdir / "results" / "keywords" / f"{sid}.parquet")
        assert set(kw.bag_id) == set(tiles.bag_id)
        assert all(set(ids) <= set(tiles.patch_id) for ids in kw.patch_ids)
        assert {"nucleus", "texture"} <= set(kw.keyword)
    # the corrupt slide is recorded as failed by the tiles stage and gets empty files
    assert pd.read_parquet(workdir / "results" / "captions" / "BROKEN.parquet").empty
    assert pd.read_parquet(workdir / "results" / "keywords" / "BROKEN.parquet").empty

    # tuning the client is no reason to caption again; a new prompt is
    cfg = json.loads((workdir / "config.yaml").read_text())
    cfg["captions"]["io_threads"] = 1
    cfg["captions"]["openai"] = {"concurrency": 4}
    (workdir / "config.yaml").write_text(json.dumps(cfg))
    p = snakemake(workdir, "captions", "-n")
    assert "Nothing to be done" in p.stdout + p.stderr, p.stdout[-2000:]
    cfg["captions"]["prompts"] = {"default": "Describe this patch."}
    (workdir / "config.yaml").write_text(json.dumps(cfg))
    p = snakemake(workdir, "captions", "-n", "--quiet", "rules")
    assert "captions_slide" in p.stdout and "keywords_slide" in p.stdout


def test_slides_per_job_puts_several_slides_in_one_job(workdir):
    cfg = json.loads((workdir / "config.yaml").read_text())
    cfg["captions"]["slides_per_job"] = 2
    (workdir / "config.yaml").write_text(json.dumps(cfg))
    p = snakemake(workdir, "captions")
    assert p.returncode == 0, p.stderr[-3000:]
    log = (workdir / "logs" / "captions" / "shard_0.log").read_text()
    summary = json.loads(log[log.index("{"):])
    assert set(summary["slides"]) == {"CMU1", "TCGA1"}
    assert (workdir / "logs" / "captions" / "shard_1.log").exists()  # BROKEN, the third slide
    assert len(pd.read_parquet(workdir / "results" / "captions" / "TCGA1.parquet")) == 21
