"""Shared reads: each patch cropped from an ancestor's read is the patch Slide.read_region gives.

Checked on the formats SHARED_READ_VENDORS lists (an Aperio SVS with one level, a generic
pyramidal TIFF with levels 1 and 4), with threads racing for the same regions as the
captions client's do; a format not listed (DICOM) has every patch read alone.
"""

from __future__ import annotations

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
    reader = SharedReader(slide, manifest_geometry(manifest), parent_rows(manifest), cache_bytes=1)
    for i in np.random.default_rng(2).permutation(len(manifest)):
        assert np.array_equal(reader.read(int(i)), expected[i]), i
        assert len(reader._regions) <= 1  # only the region in use is kept
