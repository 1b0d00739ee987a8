"""Rerun triggers of the features stage as Snakemake plans them (dry runs only).

The workdir holds empty placeholders of every file of the `features` target and its inputs,
and `snakemake --touch` records each job's params as if it had run; a dry run with a
changed config then says which jobs Snakemake would rerun, and why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUILTNET_TEXT = [f"results/text_features/quiltnet-text/{s}.h5" for s in ("synthetic_40x", "synthetic_20x")]


def snakemake(wd: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(wd),
           "--cores", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def planned(wd: Path, overlay: dict) -> dict[str, list[str]]:
    """Dry run of `features` (and the quiltnet-text text features) with ``overlay`` on top of
    config.yaml: rule -> the `encoder` wildcard of each job it would run."""
    (wd / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    out = snakemake(wd, "-n", "--configfile", str(wd / "config.yaml"), str(wd / "overlay.yaml"),
                    "--", "features", *QUILTNET_TEXT)
    jobs: dict[str, list[str]] = {}
    for rule, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", out, re.S | re.M):
        encoder = re.search(r"wildcards: .*?encoder=([\w-]+)", body)
        jobs.setdefault(rule, []).append(encoder[1] if encoder else "")
    return jobs


@pytest.fixture(scope="module")
def features_done(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("features_triggers")
    shutil.copy(REPO / "config.yaml", wd / "config.yaml")
    (wd / "demo").mkdir()
    shutil.copy(REPO / "demo" / "slides.tsv", wd / "demo" / "slides.tsv")
    summary = snakemake(wd, "-n", "--summary", "--", "features", *QUILTNET_TEXT)
    files = [line.split("\t", 1)[0] for line in summary.splitlines() if "\t" in line]
    files = [f for f in files if f != "output_file"]
    assert "results/text_features/minilm/synthetic_40x.h5" in files and QUILTNET_TEXT[0] in files, files
    for f in files:
        (wd / f).parent.mkdir(parents=True, exist_ok=True)
        (wd / f).touch()
        os.utime(wd / f, (1_700_000_000, 1_700_000_000))  # one mtime: no input is newer
    # every job "runs" by touching its outputs, which records its params in .snakemake/metadata
    snakemake(wd, "--touch", "--forceall", "--", "features", *QUILTNET_TEXT)
    assert planned(wd, {}) == {}, "with the config unchanged, nothing to be done"
    return wd


def test_read_mode_reruns_image_features_but_not_text_features(features_done):
    jobs = planned(features_done, {"features": {"read": "pyramid"}})
    assert jobs.get("features_slide") == ["tiny-vit-random"] * 2, jobs
    assert "text_features_slide" not in jobs, jobs


def test_text_features_rerun_for_their_own_encoders_weights_only(features_done, tmp_path):
    quiltnet = tmp_path / "quiltnet"
    quiltnet.mkdir()
    # quiltnet-text reads the QuiltNet folder (weights_key "quiltnet"); minilm jobs stay
    jobs = planned(features_done, {"features": {"weights": {"quiltnet": str(quiltnet)}}})
    assert jobs.get("text_features_slide") == ["quiltnet-text"] * 2, jobs
    # a minilm folder instead of the bundled copy: only the minilm text jobs
    minilm = tmp_path / "minilm"
    minilm.mkdir()
    jobs = planned(features_done, {"features": {"weights": {"minilm": str(minilm)}}})
    assert jobs.get("text_features_slide") == ["minilm"] * 2, jobs
