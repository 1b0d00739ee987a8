"""A full disk fails the tiles job naming the file, records nothing, and the rerun with space completes.

The results folder is a 2 MB tmpfs filled up to a few kB (the test mounts it: root only, as here
and in CI; elsewhere it skips). A full disk is the machine's trouble, not the slide's
(mrplip_core/io/errors.py): the job must fail, no file may look complete, and the slide must not
be recorded as a bad slide; once space is freed the same command writes the right outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SETTINGS = json.dumps({"wsi": None, "mpp_fallback": None, "failures_fatal": False, "tissue": None,
                       "tiling": {"min_tissue_fraction": 0.3, "magnifications": [5, 10, 20]}})


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs mounted at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def tiles(results: Path, table: Path) -> subprocess.CompletedProcess:
    """`mrplip tiles` as the rule runs it (a process of its own: its exit status is the job's)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    return subprocess.run([sys.executable, "-m", "mrplip_core", "tiles", "synthetic", "--table", str(table),
                           "--results", str(results), "--settings", SETTINGS],
                          capture_output=True, text=True, env=env, timeout=300)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free; returns the filler file."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_fails_the_job_records_nothing_and_the_rerun_completes(small_disk, tmp_path):
    from mrplip_core.wsi.synthetic import write_synthetic_slide

    slide = tmp_path / "synthetic.tiff"
    write_synthetic_slide(slide, 4096, 4096, 0.25, seed=1)
    table = tmp_path / "slides.tsv"
    table.write_text(f"slide_id\tpath\tmpp\nsynthetic\t{slide}\t\n")
    reference = tmp_path / "reference"
    assert tiles(reference, table).returncode == 0

    results = small_disk / "results"
    filler = fill(small_disk, leave=8 * 1024)
    full = tiles(results, table)
    assert full.returncode != 0, full.stdout + full.stderr
    assert "No space left on device" in full.stderr, full.stderr[-3000:]
    # the error names the file being written
    assert any(str(results / sub) in full.stderr for sub in ("tiles", "tissue", "slides")), full.stderr[-3000:]
    # no temporary file left; what was written before the disk filled is whole (the rule's other
    # outputs are missing, so Snakemake deletes it and reruns the job); the slide is not recorded
    written = sorted(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file())
    assert not [w for w in written if ".tmp" in w], written
    assert set(written) <= {"tiles/synthetic.parquet", "tissue/synthetic.geojson", "tissue/synthetic.png"}, written
    if "tiles/synthetic.parquet" in written:
        pd.testing.assert_frame_equal(pd.read_parquet(results / "tiles" / "synthetic.parquet"),
                                      pd.read_parquet(reference / "tiles" / "synthetic.parquet"))
    assert not (results / "slides" / "synthetic.json").exists()
    assert "status" not in full.stdout  # no record printed either
    print(full.stderr.strip().splitlines()[-1])

    filler.unlink()  # free the space: the same command now completes
    again = tiles(results, table)
    assert again.returncode == 0, again.stderr[-3000:]
    record = json.loads((results / "slides" / "synthetic.json").read_text())
    assert record["status"] == "ok" and record["error"] is None
    pd.testing.assert_frame_equal(pd.read_parquet(results / "tiles" / "synthetic.parquet"),
                                  pd.read_parquet(reference / "tiles" / "synthetic.parquet"))
    for name in ("tissue/synthetic.geojson", "tissue/synthetic.png"):
        assert (results / name).read_bytes() == (reference / name).read_bytes(), name
    assert [p.name for p in results.rglob("*") if ".tmp" in p.name] == []
