"""File names made from user-supplied strings (slide ids, region kinds, run names)."""

from __future__ import annotations

import hashlib


def safe_filename(name: str) -> str:
    """``name`` as one path component: every character other than ASCII letters, digits, ``-``,
    ``_`` and ``.`` becomes ``_``, and a leading ``.`` too (no ``..``, no hidden file). A name
    that had to change gets ``-`` and 8 hex digits of its SHA-1, so two names that differ only in
    the replaced characters (``"a/b"``, ``"a_b"``) never share a file: ``"tumour/necrosis"`` ->
    ``"tumour_necrosis-<hash>"``; a name that is already safe is returned unchanged."""
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in name)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != name or not safe:
        safe = f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe
