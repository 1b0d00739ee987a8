"""Planning big cohorts: the DAG grows linearly, and the Slurm profile packs slides in groups.

The full TCGA-sized figure (20,000 slides) comes from `python bench/dag.py` and is recorded
in docs/cluster.md; these tests run the same benchmark code on smaller cohorts so that a
change that makes planning superlinear, or breaks grouping, fails here.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_dag", REPO / "bench" / "dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def test_planning_cost_grows_linearly_with_the_cohort(tmp_path):
    small, large = 100, 600
    runs = {}
    for n in (small, large):
        folder = tmp_path / str(n)
        folder.mkdir()
        config = bench.write_cohort(folder, n)
        work = folder / "work"
        work.mkdir()
        runs[n] = bench.run_once(config, None, work)
        assert runs[n]["jobs"]["tiles_slide"] == n
        assert runs[n]["jobs"]["slides_table"] == 1
    per_slide_s = (runs[large]["cpu_seconds"] - runs[small]["cpu_seconds"]) / (large - small)
    per_slide_mib = (runs[large]["peak_rss_mib"] - runs[small]["peak_rss_mib"]) / (large - small)
    # a job per slide, every stage: about 9 ms CPU per slide on the 2-core VM (bench/README.md); the bounds
    # leave room for a loaded machine, not for an extra factor of n
    assert per_slide_s < 0.05, runs
    assert per_slide_mib < 0.25, runs
    assert runs[large]["peak_rss_mib"] < 1024, runs


@pytest.mark.parametrize("n_slides", [120])
def test_slurm_profile_packs_tiles_jobs_in_groups_of_50(tmp_path, n_slides):
    config = bench.write_cohort(tmp_path, n_slides)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "workflow" / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(REPO / "config.yaml"), str(config),
         "--profile", str(REPO / "profiles" / "slurm")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    groups = re.split(r"Group job tiles \(jobs in lexicogr. order\):", out)[1:]
    assert len(groups) == math.ceil(n_slides / 50)
    # the members of a group are printed indented under its header
    sizes = sorted(len(re.findall(r"^    rule tiles_slide:", g, re.M)) for g in groups)
    assert sum(sizes) == n_slides and max(sizes) == 50, sizes


def test_the_job_unit_shards_every_per_slide_stage(tmp_path):
    """slides_per_job of the tiles (wsi), captions and features sections: 120 slides in shards of
    50 are 3 jobs per per-slide stage, none per slide."""
    config = bench.write_cohort(tmp_path, 120, slides_per_job=50)
    work = tmp_path / "work"
    work.mkdir()
    jobs = bench.run_once(config, None, work)["jobs"]
    for stage in ("tiles", "captions", "keywords", "features", "text_features", "subcaptions"):
        assert jobs.get(f"{stage}_shard") == 3 and f"{stage}_slide" not in jobs, jobs
    assert jobs["slides_table"] == 1 and jobs["pretrain"] == 1
