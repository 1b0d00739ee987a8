"""How long Snakemake takes to plan a TCGA-sized run, and how much memory it needs.

Writes a slide table of N slides (default 20,000, about TCGA) with fake paths into a
temporary folder, then times ``snakemake -n -q`` on it from the repository root, the way a
user plans a run on a cluster login node. Missing slide files are fine: the tiles rule
treats a missing slide as a job without inputs (it would be recorded as failed).

    python bench/dag.py                          # 20,000 slides, plain and with the Slurm profile
    python bench/dag.py --slides 2000 --repeat 1
    python bench/dag.py --profile none           # only the plain DAG
    python bench/dag.py --slides-per-job 1       # a job per slide in every per-slide stage

The plan covers every stage of the default target (tiles, captions, keywords, image and text
features, pretraining and its ablation, evaluation, report). ``--slides-per-job`` sets the job
unit of the per-slide stages (``wsi``, ``captions``, ``features`` and
``pathflip.subcaptions.slides_per_job``; default 100, what a cohort run uses).

Reports the wall time, the CPU time (user + system; the figure to compare on a shared
machine) and the peak resident memory of the snakemake process (getrusage of the child),
medians over --repeat runs, and the number of jobs it planned.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def write_cohort(folder: Path, n_slides: int, slides_per_job: int = 1) -> Path:
    """A TSV of n_slides TCGA-like rows (paths that do not exist) and a config using it."""
    table = folder / "slides.tsv"
    with table.open("w") as fh:
        fh.write("slide_id\tpath\tmpp\tproject\n")
        for i in range(n_slides):
            sid = f"TCGA-{i // 1000:02d}-{i:06d}-01Z-00-DX1"
            fh.write(f"{sid}\t/cohort/tcga/{sid}.svs\t\tTCGA-{i % 33:02d}\n")
    config = folder / "config.yaml"
    # demo: [] so the table is the whole cohort; everything else from the repo's config.yaml
    spj = f"{{slides_per_job: {slides_per_job}}}"
    config.write_text(f"slides: {table}\ndemo: []\nwsi: {spj}\ncaptions: {spj}\nfeatures: {spj}\n"
                      f"pathflip: {{subcaptions: {spj}}}\n")
    return config


def run_once(config: Path, profile: str | None, workdir: Path) -> dict:
    """One `snakemake -n -q` in its own process; seconds, peak RSS (MiB) and planned jobs."""
    cmd = [*SNAKEMAKE, "-n", "-q", "rules", "--snakefile", str(REPO / "workflow" / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(REPO / "config.yaml"), str(config)]
    if profile:
        cmd += ["--profile", profile]
    # a fresh process per run, so the peak RSS of the children is this run's
    code = (
        "import resource, subprocess, sys, time, json\n"
        "t0 = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t0\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'rc': p.returncode, 'seconds': dt, 'cpu_seconds': ru.ru_utime + ru.ru_stime,"
        " 'peak_rss_mib': ru.ru_maxrss / 1024, 'stdout': p.stdout, 'stderr': p.stderr[-3000:]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True,
                         cwd=REPO, check=True)
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"snakemake failed ({res['rc']}):\n{res['stderr']}")
    res["jobs"] = _job_counts(res.pop("stdout") + res.pop("stderr"))
    return res


def _job_counts(text: str) -> dict[str, int]:
    """The 'Job stats' table that `snakemake -n -q rules` prints: rule -> count."""
    counts: dict[str, int] = {}
    text = text.split("Job stats:")[1] if "Job stats:" in text else text  # printed twice: the first
    text = text.split("\ntotal")[0] + "\ntotal" + text.split("\ntotal")[1].split("\n")[0] if "\ntotal" in text else text
    for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", text, re.M):
        rule = re.sub(r"_shard_\d+$", "_shard", m.group(1))  # the shards of a stage, summed
        counts[rule] = counts.get(rule, 0) + int(m.group(2))
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is reported")
    ap.add_argument("--profile", action="append",
                    help="profile(s) to time besides the plain run (default: profiles/slurm); 'none' for none")
    ap.add_argument("--slides-per-job", type=int, default=100,
                    help="job unit of the per-slide stages (1: a job per slide)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)
    profiles = a.profile or ["profiles/slurm"]
    variants: list[str | None] = [None] + [p for p in profiles if p != "none"]

    results = []
    with tempfile.TemporaryDirectory(prefix="mrplip-dag-") as tmp:
        config = write_cohort(Path(tmp), a.slides, a.slides_per_job)
        for profile in variants:
            runs = []
            for _ in range(a.repeat):
                # a fresh working directory: no .snakemake metadata from a previous run
                work = Path(tempfile.mkdtemp(dir=tmp))
                runs.append(run_once(config, profile, work))
            row = {
                "slides": a.slides,
                "slides_per_job": a.slides_per_job,
                "profile": profile or "(none)",
                "seconds": round(statistics.median(r["seconds"] for r in runs), 2),
                "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in runs), 2),
                "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in runs)),
                "seconds_all": [round(r["seconds"], 2) for r in runs],
                "jobs": runs[0]["jobs"],
            }
            results.append(row)
            print(f"{a.slides} slides, {a.slides_per_job} per job, profile {row['profile']}: {row['seconds']} s wall, "
                  f"{row['cpu_seconds']} s CPU, peak RSS {row['peak_rss_mib']} MiB "
                  f"(wall of each run: {row['seconds_all']}), jobs {row['jobs']}", flush=True)
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "time": time.strftime("%F %T")}
    if a.json:
        a.json.write_text(json.dumps({"machine": info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
