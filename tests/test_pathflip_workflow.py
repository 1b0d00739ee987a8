"""`snakemake pathflip` as Snakemake plans it (dry runs over placeholders, as in
test_features_workflow): in the default run, nothing to do when nothing changed, a changed
training key reruns only the PathFLIP job, a changed splitter key reruns the sub-captions and
then PathFLIP; the Slurm profile sends it to the GPU partition."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import yaml
from test_features_workflow import REPO, snakemake


def planned(wd, overlay: dict) -> set[str]:
    (wd / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    out = snakemake(wd, "-n", "--configfile", str(wd / "config.yaml"), str(wd / "overlay.yaml"), "--", "pathflip")
    return set(re.findall(r"^rule (\w+):", out, re.M))


@pytest.fixture(scope="module")
def pathflip_done(tmp_path_factory):
    wd = tmp_path_factory.mktemp("pathflip_triggers")
    shutil.copy(REPO / "config.yaml", wd / "config.yaml")
    (wd / "demo").mkdir()
    shutil.copy(REPO / "demo" / "slides.tsv", wd / "demo" / "slides.tsv")
    summary = snakemake(wd, "-n", "--summary", "--", "pathflip")
    files = [line.split("\t", 1)[0] for line in summary.splitlines() if "\t" in line]
    files = [f for f in files if f != "output_file"]
    assert "results/pathflip/demo/model.safetensors" in files, files
    for f in files:
        (wd / f).parent.mkdir(parents=True, exist_ok=True)
        (wd / f).touch()
        os.utime(wd / f, (1_700_000_000, 1_700_000_000))
    snakemake(wd, "--touch", "--forceall", "--", "pathflip")
    return wd


def test_pathflip_is_part_of_the_default_run(pathflip_done):
    out = snakemake(pathflip_done, "-n", "--forceall")
    assert re.search(r"^rule pathflip:", out, re.M)


def test_only_what_changed_reruns(pathflip_done):
    assert planned(pathflip_done, {}) == set()
    assert planned(pathflip_done, {"pathflip": {"model": {"topk": 16}}}) == {"pathflip"}
    assert planned(pathflip_done, {"pathflip": {"train": {"steps": 20}}}) == {"pathflip"}
    assert planned(pathflip_done, {"pathflip": {"subcaptions": {"min_words": 3}}}) == {"subcaptions_slide", "pathflip"}


def test_the_slurm_profile_gives_pathflip_a_gpu_node():
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    job = profile["set-resources"]["pathflip"]
    assert "gpu" in job["slurm_partition"] and job["gres"].strip("'").startswith("gpu:") and job["mpi"] == "'srun'"
