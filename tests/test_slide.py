"""Slide access on the real slides of ../shared/data and on a synthetic 40x pyramid."""

from pathlib import Path

import numpy as np
import pytest

from mrplip_core.wsi.slide import Slide, SlideError, resolve_mpp
from mrplip_core.wsi.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def synthetic_40x(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "syn40.tiff"
    return write_synthetic_slide(path, 8192, 8192, 0.25, seed=3, min_level_px=256)


def test_cmu_reports_20x_from_openslide_mpp(shared_data):
    with Slide(shared_data / "slides" / "CMU-1-Small-Region.svs", "CMU") as s:
        assert s.info.mpp == pytest.approx(0.499)
        assert s.info.mpp_source == "openslide"
        assert s.info.objective == 20.0
        assert s.info.levels == 1
        assert (s.info.width, s.info.height) == (2220, 2967)
        assert s.info.vendor == "aperio"


def test_slide_without_mpp_fails_naming_slide_and_remedy(shared_data):
    path = shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(SlideError, match=r"TCGA-CR-7395.*no microns-per-pixel.*'mpp' column"):
        Slide(path, "TCGA-CR-7395")


def test_table_mpp_and_fallback_rescue_a_slide_without_mpp(shared_data):
    path = shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    with Slide(path, "TCGA", mpp=0.5) as s:
        assert (s.mpp, s.info.mpp_source, s.info.objective) == (0.5, "table", 20.0)
        assert s.info.levels == 2
    with Slide(path, "TCGA", fallback_mpp=0.25) as s:
        assert (s.mpp, s.info.mpp_source) == (0.25, "fallback")


def test_corrupt_and_missing_slides_fail_with_their_name(shared_data, tmp_path):
    with pytest.raises(SlideError, match=r"'broken'.*OpenSlide cannot open.*broken\.svs"):
        Slide(shared_data / "slides" / "broken.svs", "broken")
    with pytest.raises(SlideError, match=r"'ghost'.*file not found"):
        Slide(tmp_path / "nope.svs", "ghost")


def test_dicom_folder_opens_with_its_pyramid(shared_data):
    with Slide(shared_data / "slides" / "CMU-1-Small-Region-dicom", "CMU-dicom") as s:
        assert s.info.vendor == "dicom"
        assert s.info.levels == 12
        assert s.info.mpp == pytest.approx(0.499)
        assert s.read_region(0, 0, 512, 128).shape == (128, 128, 3)


def test_table_beats_file_beats_tiff_tags_beats_fallback():
    props = {"openslide.mpp-x": "0.2527", "tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000"}
    assert resolve_mpp(props, table_mpp=0.5, fallback_mpp=1.0) == (0.5, "table")
    assert resolve_mpp(props, fallback_mpp=1.0) == (0.2527, "openslide")
    tiff_only = {k: v for k, v in props.items() if k.startswith("tiff.")}
    assert resolve_mpp(tiff_only) == (pytest.approx(0.25), "tiff-resolution")
    assert resolve_mpp({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600"})[0] == pytest.approx(0.25)
    # an inch resolution of 72 dpi without a unit we trust is not a microscope resolution
    assert resolve_mpp({"tiff.ResolutionUnit": "none", "tiff.XResolution": "72"}) is None
    assert resolve_mpp({}, fallback_mpp=0.5) == (0.5, "fallback")
    assert resolve_mpp({}, table_mpp=float("nan")) is None


def test_best_level_is_at_or_above_needed_resolution(synthetic_40x):
    with Slide(synthetic_40x) as s:
        assert s.info.level_downsamples == (1.0, 4.0, 16.0)
        assert s.best_level(1.0) == 0  # 40x
        assert s.best_level(2.0) == 0  # 20x: level 1 (4x) would be below the resolution
        assert s.best_level(4.0) == 1  # 10x
        assert s.best_level(8.0) == 1  # 5x
        assert s.best_level(16.0) == 2


def test_reading_from_a_coarser_level_matches_reading_level0(synthetic_40x):
    with Slide(synthetic_40x) as s:
        # a 5x patch: 4096 level-0 px to 512 px, read from level 1 and from level 0
        fast = s.read_region(2048, 2048, 4096, 512)
        exact = s.read_region(2048, 2048, 4096, 512, level=0)
        assert fast.shape == exact.shape == (512, 512, 3)
        assert np.abs(fast.astype(int) - exact.astype(int)).mean() < 4.0


def test_outside_the_slide_reads_white(synthetic_40x):
    with Slide(synthetic_40x) as s:
        tile = s.read_region(8192 - 64, 0, 128, 128)
        assert (tile[:, 64:] == 255).all()


def test_single_level_thumbnail_in_chunks_equals_one_read(shared_data):
    with Slide(shared_data / "slides" / "CMU-1-Small-Region.svs", "CMU") as s:
        big, ds = s.thumbnail(4.0, chunk_px=100_000)
        small, ds2 = s.thumbnail(4.0, chunk_px=300)
        assert ds == ds2 == pytest.approx(4.0 / 0.499)
        assert big.shape == small.shape == (int(np.ceil(2967 / ds)), int(np.ceil(2220 / ds)), 3)
        assert np.abs(big.astype(int) - small.astype(int)).mean() < 3.0
