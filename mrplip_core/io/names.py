"""File names made from user-supplied strings (slide ids, region kinds, run names)."""

from __future__ import annotations


def safe_filename(name: str) -> str:
    """``name`` with every character other than letters, digits, ``-``, ``_`` and ``.`` replaced by
    ``_``, so a kind such as ``"tumour/necrosis"`` stays one path component instead of a folder."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
