"""Labelled tiles cut from annotated regions (wsi/region_tiles.py): the held-out tile set of the
ablation bench, and what a user with region GeoJSONs makes an evaluation tile set from."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mrplip_core.evaluation.datasets import TileDataset
from mrplip_core.evaluation.settings import DatasetSpec
from mrplip_core.wsi.planted import plan_layout, write_planted_slide
from mrplip_core.wsi.region_tiles import region_tiles, write_tile_set
from mrplip_core.wsi.slide import Slide


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 2.1 mm planted slide at 0.5 um/px with three kinds, its layout and region GeoJSON."""
    root = tmp_path_factory.mktemp("planted")
    layout = plan_layout(4200, 4200, 0.5, ["tumour", "stroma", "necrosis"], np.random.default_rng(3))
    path = write_planted_slide(root / "p.tiff", layout, seed=3)
    regions = root / "p.geojson"
    regions.write_text(json.dumps(layout.regions("p")))
    return layout, path, regions


def test_each_tile_lies_in_the_region_it_is_labelled_with(planted):
    layout, path, regions = planted
    with Slide(path, "p", mpp=0.5) as slide:
        tiles = region_tiles(slide, regions, magnification=20, tile_px=256)
    assert {t.kind for t in tiles} == {"tumour", "stroma", "necrosis"}
    assert all(t.size == 256 and t.fraction >= 0.9 for t in tiles)
    for t in tiles:  # the layout itself, sampled on a 16 x 16 grid inside the tile, not the GeoJSON
        xs = t.x + (np.arange(16) + 0.5) * t.size / 16
        ys = t.y + (np.arange(16) + 0.5) * t.size / 16
        labels = layout.labels(xs, ys)
        assert (labels == layout.kinds.index(t.kind)).mean() >= 0.8, t
    # a tile over a border or glass is left out: fewer tiles than grid cells with any tissue
    grid = (4200 // 256) ** 2
    assert len(tiles) < grid


def test_magnification_sets_the_level0_box_and_per_kind_caps_with_a_seed(planted):
    _, path, regions = planted
    with Slide(path, "p", mpp=0.5) as slide:
        at10 = region_tiles(slide, regions, magnification=10, tile_px=256, per_kind=3, seed=1)
        again = region_tiles(slide, regions, magnification=10, tile_px=256, per_kind=3, seed=1)
        other = region_tiles(slide, regions, magnification=10, tile_px=256, per_kind=3, seed=2)
        with pytest.raises(ValueError, match="min_fraction"):
            region_tiles(slide, regions, magnification=10, tile_px=256, min_fraction=0.0)
    assert all(t.size == 512 for t in at10)  # 256 px at 1 um/px on a 0.5 um/px slide
    assert pd.Series([t.kind for t in at10]).value_counts().max() <= 3
    assert at10 == again and at10 != other


def test_tile_set_reads_back_as_an_evaluation_dataset(planted, tmp_path):
    _, path, regions = planted
    with Slide(path, "p", mpp=0.5) as slide:
        df = write_tile_set([(slide, regions)], tmp_path / "tiles", magnification=20, tile_px=128, per_kind=4)
    assert list(df.columns[:2]) == ["path", "label"] and len(df) == 12
    ds = TileDataset.load(DatasetSpec("planted", str(tmp_path / "tiles" / "labels.csv"), mpp=0.5))
    assert ds.class_counts() == {"necrosis": 4, "stroma": 4, "tumour": 4}
    rgb = ds.read(0)
    assert rgb.shape == (128, 128, 3) and rgb.std() > 5  # tissue, not a blank tile
    assert not list((tmp_path / "tiles").rglob("*.tmp*"))


def test_a_kind_with_a_slash_is_one_folder_and_keeps_its_label(planted, tmp_path):
    _, path, regions = planted
    renamed = tmp_path / "renamed.geojson"
    renamed.write_text(regions.read_text().replace('"necrosis"', '"tumour/necrosis"'))
    with Slide(path, "p", mpp=0.5) as slide:
        df = write_tile_set([(slide, renamed)], tmp_path / "tiles", magnification=20, tile_px=64, per_kind=2)
    assert "tumour/necrosis" in set(df["label"])
    folders = {p.name for p in (tmp_path / "tiles").iterdir() if p.is_dir()}
    assert len(folders) == 3 and {"stroma", "tumour"} < folders
    assert [f for f in folders if f.startswith("tumour_necrosis-")]
    ds = TileDataset.load(DatasetSpec("planted", str(tmp_path / "tiles" / "labels.csv"), mpp=0.5))
    assert ds.class_counts()["tumour/necrosis"] == 2
