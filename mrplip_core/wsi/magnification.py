"""Magnification <-> microns-per-pixel, with tolerance bands.

Convention (as in the MR-PLIP paper and most WSI tooling): magnification M corresponds to
``10 / M`` um/px, so 40x = 0.25 um/px, 20x = 0.5, 10x = 1.0, 5x = 2.0. A scanner's
objective is never read from the pyramid level: it is derived from the slide's mpp.
"""

from __future__ import annotations

import math

#: Nominal objective magnifications a scan is snapped to (x).
NOMINAL_MAGNIFICATIONS: tuple[float, ...] = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0)

#: A scan whose mpp-derived magnification is within this factor of a nominal one is called
#: that nominal magnification (0.2525 um/px -> 39.6x -> 40x; 0.2265 um/px (NDPI) -> 44x -> 40x).
BAND_FACTOR: float = 1.25


def mpp_to_magnification(mpp: float) -> float:
    """Exact magnification (x) of a resolution in um/px: ``10 / mpp``."""
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp!r}")
    return 10.0 / mpp


def magnification_to_mpp(magnification: float) -> float:
    """Resolution in um/px of a magnification (x): ``10 / magnification``."""
    if not magnification > 0:
        raise ValueError(f"magnification must be positive, got {magnification!r}")
    return 10.0 / magnification


def nominal_magnification(mpp: float, band_factor: float = BAND_FACTOR) -> float | None:
    """Snap a scan resolution (um/px) to the nominal objective within ``band_factor``.

    Returns None when no nominal magnification lies within the band (an unusual scan);
    callers then use the exact ``mpp_to_magnification`` value.
    """
    exact = mpp_to_magnification(mpp)
    best = min(NOMINAL_MAGNIFICATIONS, key=lambda m: abs(math.log(exact / m)))
    return best if abs(math.log(exact / best)) <= math.log(band_factor) else None


def base_magnification(mpp: float) -> float:
    """Objective magnification (x) of a scan: nominal band if any, else the exact value."""
    nominal = nominal_magnification(mpp)
    return nominal if nominal is not None else round(mpp_to_magnification(mpp), 2)


def format_magnification(magnification: float) -> str:
    """Short label used in ids and HDF5 group names: 5.0 -> '5x', 1.25 -> '1.25x'."""
    return f"{magnification:g}x"
