"""The tiles stage for one slide, on the real slides and a synthetic 40x slide."""

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mrplip_core.cli import main as mrplip
from mrplip_core.wsi.slide import Slide, SlideError
from mrplip_core.wsi.synthetic import write_synthetic_slide
from mrplip_core.wsi.tiling import TilesOutputs, TilesSettings, tile_slide


def _outputs(root, sid):
    return TilesOutputs(
        root / "tiles" / f"{sid}.parquet", root / "tissue" / f"{sid}.geojson",
        root / "tissue" / f"{sid}.png", root / "slides" / f"{sid}.json",
    )


def _run(tmp_path, sid, path, settings=None, **kw):
    out = _outputs(tmp_path / "results", sid)
    rec = tile_slide(sid, path, out, settings or TilesSettings(), **kw)
    assert json.loads(out.record.read_text()) == json.loads(json.dumps(rec))
    return rec, pd.read_parquet(out.manifest), out


# The CMU region holds a single 5x parent cell (2052 level-0 px), 36 % tissue.
LENIENT = TilesSettings.from_dict({"tiling": {"min_tissue_fraction": 0.3}})


def test_cmu_20x_slide_skips_40x_and_records_it(shared_data, tmp_path):
    rec, df, out = _run(tmp_path, "CMU-1", shared_data / "slides" / "CMU-1-Small-Region.svs", LENIENT)
    assert rec["status"] == "ok" and rec["error"] is None
    assert rec["objective"] == 20.0 and rec["skipped_magnifications"] == [40.0]
    assert rec["magnifications"] == [5.0, 10.0, 20.0]
    assert rec["n_parents"] == 1
    assert len(df) == 1 + 4 + 16 and set(df.magnification) == {5.0, 10.0, 20.0}
    assert (df.read_level == 0).all()  # single-level slide
    geo = json.loads(out.geojson.read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    xs = [pt[0] for f in geo["features"] for ring in f["geometry"]["coordinates"] for pt in ring]
    assert 0 <= min(xs) and max(xs) <= 2220 + 1  # level-0 px, not thumbnail px
    assert Image.open(out.qc).size[0] > 100


def test_slide_without_mpp_is_recorded_then_rescued_by_table_mpp(shared_data, tmp_path):
    path = shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    rec, df, out = _run(tmp_path, "TCGA-CR-7395", path)
    assert rec["status"] == "failed" and "TCGA-CR-7395" in rec["error"] and "mpp" in rec["error"]
    assert df.empty and list(df.columns)[:4] == ["slide_id", "patch_id", "parent_id", "bag_id"]
    assert json.loads(out.geojson.read_text())["features"] == []
    assert Image.open(out.qc).size == (640, 256)  # the error card
    rec, df, _ = _run(tmp_path, "TCGA-CR-7395", path, table_mpp=0.5)
    assert rec["status"] == "ok" and rec["mpp_source"] == "table" and rec["n_parents"] >= 1
    # 10x patches (1024 level-0 px -> 512) come from level 1 (downsample 2.0005)
    assert set(df[df.magnification == 10.0].read_level) == {1}
    assert set(df[df.magnification == 20.0].read_level) == {0}


def test_corrupt_slide_recorded_or_fatal(shared_data, tmp_path):
    path = shared_data / "slides" / "broken.svs"
    rec, df, _ = _run(tmp_path, "broken", path)
    assert rec["status"] == "failed" and "broken" in rec["error"] and df.empty
    with pytest.raises(SlideError, match="broken"):
        tile_slide("broken", path, _outputs(tmp_path / "fatal", "broken"), TilesSettings(failures_fatal=True))
    assert not (tmp_path / "fatal" / "slides" / "broken.json").exists()


def test_dicom_copy_opens_and_tiles(shared_data, tmp_path):
    # Its colours decode wrongly through OpenSlide (YBR read as RGB: pink glass), so the
    # tissue mask is meaningless here; this checks the format and the pyramid only.
    every_cell = TilesSettings.from_dict({"tiling": {"min_tissue_fraction": 0.0}})
    rec, df, _ = _run(tmp_path, "CMU-dicom", shared_data / "slides" / "CMU-1-Small-Region-dicom", every_cell)
    assert rec["status"] == "ok" and rec["vendor"] == "dicom" and rec["levels"] == 12
    assert len(df) == 21
    # 5x = 2052 level-0 px -> 512 px: downsample 4.008, read from level 2 (4.002)
    assert df.groupby("magnification").read_level.first().to_dict() == {5.0: 2, 10.0: 1, 20.0: 0}


@pytest.fixture(scope="module")
def syn40(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("syn") / "syn40.tiff", 12288, 12288, 0.25, seed=5)


def test_synthetic_40x_all_four_magnifications_and_patches_read_back(syn40, tmp_path, capsys):
    settings = TilesSettings.from_dict({"tiling": {"n_parents": 2, "selection": "most_tissue"}})
    rec, df, out = _run(tmp_path, "syn40", syn40, settings)
    assert rec["magnifications"] == [5.0, 10.0, 20.0, 40.0] and rec["skipped_magnifications"] == []
    assert len(df) == 2 * 85
    assert df.groupby("magnification").read_level.first().to_dict() == {5.0: 1, 10.0: 1, 20.0: 0, 40.0: 0}
    # `mrplip tile` writes exactly the pixels the pipeline defines for that patch
    pid = df[df.magnification == 40.0].patch_id.iloc[5]
    png = tmp_path / "p.png"
    assert mrplip(["tile", pid, "--results", str(tmp_path / "results"), "-o", str(png)]) == 0
    row = df.set_index("patch_id").loc[pid]
    with Slide(syn40) as s:
        direct = s.read_region(int(row.x), int(row.y), int(row["size"]), 512, level=int(row.read_level))
    assert np.array_equal(np.asarray(Image.open(png)), direct)
    assert mrplip(["tile", "syn40_40x_x1_y1", "--results", str(tmp_path / "results")]) == 2
    assert "not in" in capsys.readouterr().err


def test_unknown_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="n_parent"):
        TilesSettings.from_dict({"tiling": {"n_parent": 2}})


def test_inspect_parquet_and_hdf5(syn40, tmp_path, capsys):
    _, df, out = _run(tmp_path, "syn40", syn40, TilesSettings.from_dict({"tiling": {"n_parents": 1}}))
    assert mrplip(["inspect", str(out.manifest), "--rows", "2", "--full"]) == 0
    text = capsys.readouterr().out
    assert f"rows: {len(df)}" in text and f"  patch_id: {df.patch_id.iloc[0]}\n" in text
    h5 = tmp_path / "f.h5"
    with h5py.File(h5, "w") as f:
        g = f.create_group("5x")
        g.attrs["encoder"] = "demo"
        g.create_dataset("features", data=np.arange(12, dtype=np.float16).reshape(3, 4))
    assert mrplip(["inspect", str(h5)]) == 0
    text = capsys.readouterr().out
    assert "5x/: group" in text and "features: dataset (3, 4) float16" in text and "encoder = 'demo'" in text
    assert mrplip(["inspect", str(tmp_path / "missing.parquet")]) == 2
    assert "no such artifact" in capsys.readouterr().err
