"""Shared reads: each patch cropped from an ancestor's read is the patch Slide.read_region gives.

Checked on the formats SHARED_READ_VENDORS lists (an Aperio SVS with one level, a generic
pyramidal TIFF with levels 1 and 4), with threads racing for the same regions as the
captions client's do; a format not listed (DICOM) has every patch read alone.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mrplip_core.wsi.shared_reads import SHARED_READ_VENDORS, SharedReader, manifest_geometry, parent_rows
from mrplip_core.wsi.slide import Slide
from mrplip_core.wsi.synthetic import write_synthetic_slide
from mrplip_core.wsi.tiling import TilesOutputs, TilesSettings, tile_slide

TILING = {"patch_px": 128, "n_parents": 2, "selection": "most_tissue", "min_tissue_fraction": 0.1}


def tiled(slide: Path, out: Path, magnifications: list[int]) -> tuple[pd.DataFrame, Slide]:
    outs = TilesOutputs(out / "m.parquet", out / "t.geojson", out / "t.png", out / "r.json")
    settings = TilesSettings.from_dict({"tiling": {**TILING, "magnifications": magnifications}})
    rec = tile_slide("s", slide, outs, settings)
    assert rec["status"] == "ok" and rec["n_patches"] > 0, rec
    return pd.read_parquet(outs.manifest), Slide(rec["path"], "s", mpp=rec["mpp"])


@pytest.fixture(scope="module")
def svs(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    return tiled(shared_data / "slides" / "CMU-1-Small-Region.svs", tmp_path_factory.mktemp("svs"), [5, 10, 20])


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pyramid")
    return tiled(write_synthetic_slide(out / "p.tiff", 4096, 3072, 0.25, seed=3), out, [5, 10, 20, 40])


def counting(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every level read (Slide.read_rect; Slide.read_region goes through it)."""
    reads: list = []
    original = Slide.read_rect
    monkeypatch.setattr(Slide, "read_rect", lambda self, *a, **k: reads.append(a) or original(self, *a, **k))
    return reads


def alone(slide: Slide, manifest: pd.DataFrame) -> list[np.ndarray]:
    return [slide.read_region(r.x, r.y, r.size, r.patch_px, level=r.read_level) for r in manifest.itertuples()]


@pytest.mark.parametrize("which", ["svs", "pyramid"])
def test_threads_racing_get_exact_patches_from_one_read_per_region(which, request, monkeypatch) -> None:
    manifest, slide = request.getfixturevalue(which)
    assert slide.info.vendor in SHARED_READ_VENDORS
    expected = alone(slide, manifest)
    reader = SharedReader(slide, manifest_geometry(manifest), parent_rows(manifest))
    sources = reader.sources
    n_regions = len(set(sources[sources != np.arange(len(manifest))].tolist()))
    assert n_regions >= 2  # children of both bags are cropped
    reads = counting(monkeypatch)
    order = np.random.default_rng(1).permutation(len(manifest))  # children before parents too
    with ThreadPoolExecutor(6) as pool:
        got = dict(zip(order.tolist(), pool.map(lambda i: reader.read(int(i)), order)))
    monkeypatch.undo()
    for i, patch in enumerate(expected):
        assert np.array_equal(got[i], patch), i
    # each region decoded once; the rows nothing is cropped from, once each
    assert len(reads) == n_regions + int((np.bincount(sources, minlength=len(sources)) == 1).sum())
    assert reader.kept_bytes == 0  # every region dropped after the last patch it serves


def test_a_format_not_checked_for_exact_crops_reads_every_patch_alone(shared_data: Path, tmp_path: Path, monkeypatch) -> None:
    manifest, slide = tiled(shared_data / "slides" / "CMU-1-Small-Region-dicom", tmp_path, [5, 10, 20])
    assert slide.info.vendor not in SHARED_READ_VENDORS
    reader = SharedReader(slide, manifest_geometry(manifest), parent_rows(manifest))
    assert reader.sources.tolist() == list(range(len(manifest)))
    reads = counting(monkeypatch)
    got = [reader.read(i) for i in range(len(manifest))]
    monkeypatch.undo()
    assert len(reads) == len(manifest)
    assert all(np.array_equal(a, b) for a, b in zip(got, alone(slide, manifest)))


def test_a_tight_cache_evicts_but_never_changes_a_patch(pyramid) -> None:
    manifest, slide = pyramid
    expected = alone(slide, manifest)
    roomy = SharedReader(slide, manifest_geometry(manifest), parent_rows(manifest))
    shared = sorted(set(roomy.sources.tolist()) - set(np.flatnonzero(np.bincount(roomy.sources) == 1).tolist()))
    largest = max(3 * int(roomy._level_px[r]) ** 2 for r in shared)
    reader = SharedReader(slide, manifest_geometry(manifest), parent_rows(manifest), cache_bytes=largest)
    assert reader.sources.tolist() == roomy.sources.tolist()  # every region fits alone
    for i in np.random.default_rng(2).permutation(len(manifest)):
        assert np.array_equal(reader.read(int(i)), expected[i]), i
        assert reader.kept_bytes <= largest
    # a cache smaller than a region shares nothing that large: those rows are read alone
    small = SharedReader(slide, manifest_geometry(manifest), parent_rows(manifest), cache_bytes=largest - 1)
    too_big = [r for r in shared if 3 * int(roomy._level_px[r]) ** 2 > largest - 1]
    assert too_big and not set(too_big) & set(small.sources[small.sources != np.arange(len(manifest))].tolist())


def test_a_failed_region_read_raises_once_and_the_waiting_patches_read_alone(svs, monkeypatch) -> None:
    """The thread that reads a region gets the error; threads waiting on it read their patch on
    their own (nobody hangs), and the next rows read it again."""
    manifest, slide = svs
    expected = alone(slide, manifest)
    reader = SharedReader(slide, manifest_geometry(manifest), parent_rows(manifest))
    root = int(reader.sources[1])
    original = Slide.read_rect
    gate = threading.Event()
    fails = {"n": 0}

    def flaky(self, x, y, w, h, ow, oh, level=None):
        if (w, ow) == (int(manifest["size"].iloc[root]), int(reader._level_px[root])) and fails["n"] == 0:
            fails["n"] += 1
            gate.wait(5)  # the others are waiting on this region by now
            raise OSError("simulated read failure")
        return original(self, x, y, w, h, ow, oh, level=level)

    monkeypatch.setattr(Slide, "read_rect", flaky)
    rows = [i for i in range(len(manifest)) if reader.sources[i] == root][:6]
    with ThreadPoolExecutor(len(rows)) as pool:
        futures = [pool.submit(reader.read, i) for i in rows]
        time.sleep(0.5)
        gate.set()
        results = [(f.exception(timeout=30), f) for f in futures]
    failed = [r for r, (e, _) in zip(rows, results) if e is not None]
    assert len(failed) == 1 and fails["n"] == 1
    for r, (e, f) in zip(rows, results):
        if e is None:
            assert np.array_equal(f.result(), expected[r]), r
    rest = [i for i in range(len(manifest)) if reader.sources[i] == root and i not in rows]
    for i in rest:  # the region is read again for the rows still to come
        assert np.array_equal(reader.read(i), expected[i]), i
