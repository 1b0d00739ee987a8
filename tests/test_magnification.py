import pytest

from mrplip_core.wsi.magnification import (
    base_magnification,
    format_magnification,
    magnification_to_mpp,
    mpp_to_magnification,
    nominal_magnification,
)


@pytest.mark.parametrize(
    ("mpp", "expected"),
    [
        (0.25, 40.0),
        (0.2525, 40.0),  # Aperio AT2 40x
        (0.2265, 40.0),  # Hamamatsu NDPI 40x
        (0.263, 40.0),  # Leica 40x
        (0.499, 20.0),  # CMU-1 (Aperio 20x)
        (0.5, 20.0),
        (1.0, 10.0),
        (2.0, 5.0),
    ],
)
def test_scanner_resolutions_snap_to_their_objective(mpp, expected):
    assert base_magnification(mpp) == expected


def test_resolution_between_bands_keeps_its_exact_magnification():
    # 0.33 um/px is 30.3x: more than 25 % from both 20x and 40x
    assert nominal_magnification(0.33) is None
    assert base_magnification(0.33) == pytest.approx(30.3, abs=0.01)


def test_magnification_and_mpp_are_inverse():
    assert magnification_to_mpp(40) == 0.25
    assert mpp_to_magnification(magnification_to_mpp(7.0)) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="positive"):
        mpp_to_magnification(0)


def test_labels():
    assert format_magnification(5.0) == "5x"
    assert format_magnification(1.25) == "1.25x"
