"""Reading patches for captioning: a bag's level-0 patches share one read, pixel for pixel."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_captions_support import make_tiles

from mrplip_core.captions.patches import SlideReader, load_manifest, tasks_from_manifest
from mrplip_core.captions.settings import CaptionSettings
from mrplip_core.wsi.slide import Slide


@pytest.fixture(scope="module")
def results(shared_data, tmp_path_factory):
    return make_tiles(shared_data, tmp_path_factory.mktemp("results"))


def reader_and_tasks(results, skip=frozenset(), **kw):
    rec = json.loads((results / "slides" / "CMU1.json").read_text())
    manifest = load_manifest(results / "tiles" / "CMU1.parquet")
    tasks = tasks_from_manifest(manifest, CaptionSettings(), skip)
    reader = SlideReader({"CMU1": (rec["path"], rec["mpp"])}, **kw)
    reader.share_reads("CMU1", manifest, tasks)
    return reader, tasks, Slide(rec["path"], "CMU1", mpp=rec["mpp"])


def counting_reads(monkeypatch) -> list:
    """Every level read the reader makes (Slide.read_rect; read_region goes through it)."""
    reads = []
    original = Slide.read_rect
    monkeypatch.setattr(Slide, "read_rect", lambda self, *a, **k: reads.append(a) or original(self, *a, **k))
    return reads


def test_shared_reads_equal_reading_each_patch_alone(results, monkeypatch):
    reader, tasks, slide = reader_and_tasks(results)
    # CMU-1-Small-Region has one level: every patch of a bag is read from level 0, inside its root
    assert {t.read_level for t in tasks} == {0} and len(tasks) == 42
    reads = counting_reads(monkeypatch)
    with ThreadPoolExecutor(4) as pool:  # threads racing for the same bag
        got = list(pool.map(reader.read, tasks))
    monkeypatch.undo()
    assert len(reads) == 2  # each bag's root read once, 42 patches cropped from them
    for t, img in zip(tasks, got):
        alone = slide.read_region(t.x, t.y, t.size, t.patch_px, level=t.read_level)
        assert img.shape == (t.patch_px, t.patch_px, 3) and img.dtype == np.uint8
        assert np.array_equal(img, alone), t.patch_id
    assert reader._shared["CMU1"].kept_bytes == 0  # each region dropped after its last patch
    reader.close()


def test_bags_not_worth_sharing_are_read_patch_by_patch(results, monkeypatch):
    ids = [t.patch_id for t in reader_and_tasks(results)[1]]
    parents = {i for i in ids if "_5x_" in i}
    # resumed run: only the 20x patches of one quarter of each bag are left, far apart
    left = [i for i in ids if "_20x_" in i][::5]
    reader, tasks, slide = reader_and_tasks(results, skip=frozenset(set(ids) - set(left)))
    assert [t.patch_id for t in tasks] == left and not parents & set(left)
    reads = counting_reads(monkeypatch)
    got = [reader.read(t) for t in tasks]
    monkeypatch.undo()
    assert len(reads) == len(tasks)  # reading the bag root for a few of its patches would decode more
    for t, img in zip(tasks, got):
        assert np.array_equal(img, slide.read_region(t.x, t.y, t.size, t.patch_px, level=t.read_level))
    # and sharing off (cache_bytes=0) reads every patch alone, with the same pixels
    off, tasks, _ = reader_and_tasks(results, cache_bytes=0)
    for t in tasks[:6]:
        assert np.array_equal(off.read(t), slide.read_region(t.x, t.y, t.size, t.patch_px, level=t.read_level))
