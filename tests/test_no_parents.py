"""A slide that opens but gives no parent (too small, or too little tissue) gets status
``no_parents`` and a reason with the numbers, never ``ok`` with 0 patches; it is not fatal,
and the slides table (Int64 counts), ``mrplip inspect`` and the report show why."""

from __future__ import annotations

import json
import re

import h5py
import pandas as pd
import pytest

from mrplip_core.cli import main as mrplip
from mrplip_core.report import build_report
from mrplip_core.wsi.records import COUNT_COLUMNS, collect_slide_records
from mrplip_core.wsi.synthetic import write_synthetic_slide
from mrplip_core.wsi.tiling import TilesOutputs, TilesSettings, tile_slide

# CMU-1-Small-Region.svs: 2220 x 2967 px at 0.499 um/px (1.11 x 1.48 mm); one 5x parent is
# 2052 px (1.02 mm), so the grid holds one box, 35 % of it tissue: below the default 0.5.
CMU_REASON = ("slide 'CMU-1': no 5x parent: the slide (1.11 x 1.48 mm) holds 1 parent box of 1.02 x 1.02 mm, "
              "0 with tissue fraction >= tiling.min_tissue_fraction 0.5; the best has 0.35")


def _tile(results, sid, path, settings=None):
    out = TilesOutputs(results / "tiles" / f"{sid}.parquet", results / "tissue" / f"{sid}.geojson",
                       results / "tissue" / f"{sid}.png", results / "slides" / f"{sid}.json")
    return tile_slide(sid, path, out, settings or TilesSettings()), out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, shared_data):
    """CMU-1 (no_parents with the defaults), broken.svs (failed), a missing file (failed)
    and a slide never tiled (missing), collected into results/slides.parquet."""
    base = tmp_path_factory.mktemp("noparents")
    res = base / "results"
    s = shared_data / "slides"
    rows = [("CMU-1", str(s / "CMU-1-Small-Region.svs")), ("broken", str(s / "broken.svs")),
            ("ghost", str(base / "ghost.svs"))]
    records = {sid: _tile(res, sid, path)[0] for sid, path in rows}
    rows.append(("never-tiled", str(base / "later.svs")))
    pd.DataFrame(rows, columns=["slide_id", "path"]).to_csv(base / "slides.tsv", sep="\t", index=False)
    df = collect_slide_records(base / "slides.tsv", res / "slides", res / "slides.parquet")
    return base, res, records, df


def test_cmu_with_default_tiling_is_no_parents_with_the_numbers(cohort):
    base, res, records, _ = cohort
    rec = records["CMU-1"]
    assert rec["status"] == "no_parents" and rec["error"] is None
    assert rec["reason"] == CMU_REASON
    assert rec["n_parents"] == 0 and rec["n_patches"] == 0 and rec["parent_size"] == 2052
    assert json.loads((res / "slides" / "CMU-1.json").read_text())["reason"] == CMU_REASON
    manifest = pd.read_parquet(res / "tiles" / "CMU-1.parquet")
    assert manifest.empty and "patch_id" in manifest.columns  # empty outputs, as for a failed slide
    assert (res / "tissue" / "CMU-1.png").stat().st_size > 0
    assert records["broken"]["status"] == "failed" and records["broken"]["reason"] is None


def test_no_parents_is_not_fatal(shared_data, tmp_path):
    fatal = TilesSettings(failures_fatal=True)
    rec, out = _tile(tmp_path / "results", "CMU-1", shared_data / "slides" / "CMU-1-Small-Region.svs", fatal)
    assert rec["status"] == "no_parents" and out.record.exists()
    table = tmp_path / "slides.tsv"
    table.write_text(f"slide_id\tpath\nCMU-1\t{shared_data / 'slides' / 'CMU-1-Small-Region.svs'}\n")
    assert mrplip(["slides-table", "--table", str(table), "--results", str(tmp_path / "results"), "--fatal"]) == 0


def test_a_slide_smaller_than_one_parent_says_so(tmp_path):
    path = write_synthetic_slide(tmp_path / "tiny.tiff", 1600, 1200, 0.5, seed=3)  # 0.80 x 0.60 mm
    rec, _ = _tile(tmp_path / "results", "tiny", path)
    assert rec["status"] == "no_parents" and rec["n_patches"] == 0
    assert rec["reason"] == ("slide 'tiny': no 5x parent: the slide (0.80 x 0.60 mm) is smaller than one parent "
                             "box (1.02 x 1.02 mm), so it has no candidate")


def test_slides_table_counts_are_int64_with_failed_rows(cohort):
    _, res, _, df = cohort
    back = pd.read_parquet(res / "slides.parquet").set_index("slide_id")
    assert back["status"].to_dict() == {"CMU-1": "no_parents", "broken": "failed", "ghost": "failed",
                                        "never-tiled": "missing"}
    for c in COUNT_COLUMNS:
        assert str(back[c].dtype) == "Int64", c
    assert back.at["CMU-1", "width"] == 2220 and back.at["CMU-1", "n_parents"] == 0
    assert pd.isna(back.at["broken", "n_parents"]) and pd.isna(back.at["broken", "width"])
    assert back.at["CMU-1", "reason"] == CMU_REASON and pd.isna(back.at["CMU-1", "error"])
    assert "broken" in back.at["broken", "error"] and pd.isna(back.at["broken", "reason"])


def test_inspect_lists_the_slides_not_ok_with_their_reason(cohort, capsys):
    _, res, _, _ = cohort
    assert mrplip(["inspect", str(res / "slides.parquet"), "--rows", "1"]) == 0
    text = capsys.readouterr().out
    assert "slides not ok: 4 of 4" in text
    assert f"  CMU-1 [no_parents]: {CMU_REASON}\n" in text
    assert re.search(r"^  broken \[failed\]: .*broken", text, flags=re.M)
    assert "  never-tiled [missing]: no record at" in text


def test_report_shows_the_reason(cohort):
    base, res, _, _ = cohort
    html = build_report(res, base / "report").read_text()
    slides = html.split('<section id="slides">', 1)[1].split("</section>", 1)[0]
    assert '<span class="badge warn">no_parents</span>' in slides
    assert "no 5x parent: the slide (1.11 x 1.48 mm) holds 1 parent box" in slides.replace("&#x27;", "'")
    assert '<span class="badge bad">failed</span>' in slides and "error or reason" in slides


def test_image_features_of_a_no_parents_slide_are_empty_with_the_reason(cohort, tmp_path):
    from mrplip_core.features import FeatureSettings
    from mrplip_core.features.image import extract_image_features

    _, res, _, _ = cohort
    out = tmp_path / "CMU-1.h5"
    summary = extract_image_features("CMU-1", res / "tiles" / "CMU-1.parquet", res / "slides" / "CMU-1.json", out,
                                     FeatureSettings(device="cpu", num_workers=0))
    assert summary["status"] == "empty" and "no_parents" in summary["error"] and "1.11 x 1.48 mm" in summary["error"]
    with h5py.File(out) as f:
        assert f.attrs["status"] == "empty" and "min_tissue_fraction" in f.attrs["reason"]
