"""The slide table: a TSV with ``slide_id`` and ``path``, optional ``mpp`` and labels.

Relative paths resolve against the table's folder. Slide ids become file names of
every artifact, so they must be unique and made of ``[A-Za-z0-9._-]``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

SLIDE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_SLIDE_ID_RE = re.compile(rf"^{SLIDE_ID_PATTERN}$")


class SlideTableError(ValueError):
    """The slide table is malformed; the message names the file, row and column."""


def read_slide_table(path: str | Path) -> pd.DataFrame:
    """Read and validate a slide table.

    Returns a frame indexed by ``slide_id`` with an absolute ``path`` column, an ``mpp``
    column (float um/px, NaN where not given) and any label columns unchanged.

    Raises :class:`SlideTableError` naming the file (and the row or slide where there is one)
    when the table is missing, empty (no header, or a header and no slides), lacks
    ``slide_id`` or ``path``, has an id that is not ``[A-Za-z0-9._-]`` (spaces, non-ASCII),
    an empty path, a duplicate id, or an ``mpp`` that is not a positive number.
    """
    path = Path(path)
    if not path.exists():
        raise SlideTableError(f"slide table not found: {path}")
    # Lines starting with "#" are comments; a "#" inside a field (a caption's "block #2") is text.
    import io

    text = "".join(line for line in path.read_text(encoding="utf-8-sig").splitlines(keepends=True)
                   if not line.lstrip().startswith("#"))
    if not text.strip():
        raise SlideTableError(f"{path}: the slide table is empty (expected a header line with slide_id and path)")
    df = pd.read_csv(io.StringIO(text), sep="\t", dtype={"slide_id": str, "path": str})
    missing = {"slide_id", "path"} - set(df.columns)
    if missing:
        raise SlideTableError(f"{path}: missing column(s) {sorted(missing)}; found {list(df.columns)}")
    if df.empty:
        raise SlideTableError(f"{path}: the slide table lists no slides (a header and no rows)")
    for row, (sid, spath) in enumerate(zip(df["slide_id"], df["path"]), start=2):
        if not isinstance(sid, str) or not _SLIDE_ID_RE.match(sid):
            raise SlideTableError(f"{path} line {row}: slide_id {sid!r} must match {SLIDE_ID_PATTERN}")
        if not isinstance(spath, str) or not spath.strip():
            raise SlideTableError(f"{path} line {row}: slide {sid!r} has an empty path")
    dup = df["slide_id"][df["slide_id"].duplicated()].unique()
    if len(dup):
        raise SlideTableError(f"{path}: duplicate slide_id(s) {list(dup)[:10]}")
    base = path.resolve().parent
    df["path"] = [str(p if Path(p).is_absolute() else (base / p)) for p in (s.strip() for s in df["path"])]
    if "mpp" in df.columns:
        mpp = pd.to_numeric(df["mpp"], errors="coerce")
        bad = df["slide_id"][df["mpp"].notna() & (mpp.isna() | (mpp <= 0))]
        if len(bad):
            raise SlideTableError(f"{path}: column 'mpp' must be a positive number (um/px) for {list(bad)}")
        df["mpp"] = mpp.astype(float)
    else:
        df["mpp"] = float("nan")
    return df.set_index("slide_id", drop=False)




def table_mpp(table: pd.DataFrame, slide_id: str) -> float | None:
    """The slide table's mpp override of ``slide_id`` (um/px), or None where it gives none."""
    v = table.at[slide_id, "mpp"]
    return None if v is None or v != v else float(v)  # NaN: no override
