"""Slide captions for PathFLIP: one row per slide, with why a slide has no usable caption.

Captions come from the slide table's ``caption`` column or from a file (``pathflip.captions``:
CSV, TSV or Parquet with columns ``slide_id`` and ``caption``); the file wins where both give
one. The result, ``results/slide_captions.parquet``, has a row per slide of the table and one
per caption-file row naming a slide that is not in it:

``slide_id``, ``caption``, ``source`` (table, file, or none), ``status``, ``reason``, ``n_chars``.

``status`` is ``ok``, or why the slide is left out of PathFLIP (only PathFLIP: the other
stages do not read captions): ``missing`` (no caption), ``empty`` (white space only),
``too_long`` (more than ``max_caption_chars`` characters: a whole report pasted in, or a
file read with the wrong delimiter) or ``not_in_slide_table``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

COLUMNS = ["slide_id", "caption", "source", "status", "reason", "n_chars"]


class CaptionFileError(ValueError):
    """A caption file that cannot be read as slide_id, caption rows (names the file)."""


def read_caption_file(path: str | Path) -> pd.DataFrame:
    """``slide_id``, ``caption`` of a CSV, TSV or Parquet file (other columns are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionFileError(f"caption file not found: {path}")
    try:
        if path.suffix.lower() == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="\t" if path.suffix.lower() in (".tsv", ".tab") else ",",
                             dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CaptionFileError(f"caption file {path} cannot be read: {exc}") from None
    missing = [c for c in ("slide_id", "caption") if c not in df.columns]
    if missing:
        raise CaptionFileError(f"caption file {path} lacks column(s) {missing}; it has {list(df.columns)}")
    duplicated = sorted(set(df.loc[df["slide_id"].duplicated(), "slide_id"]))
    if duplicated:
        raise CaptionFileError(f"caption file {path} gives slide(s) {duplicated[:5]} more than one caption")
    return df[["slide_id", "caption"]].astype({"slide_id": str})


def _row(slide_id: str, caption: object, source: str, max_chars: int) -> dict:
    text = "" if caption is None or (isinstance(caption, float) and caption != caption) else str(caption)
    if source == "none":
        status, reason = "missing", "no caption in the slide table or the caption file"
    elif not text.strip():
        status, reason = "empty", f"the {source}'s caption is empty"
    elif len(text) > max_chars:
        status, reason = "too_long", (f"the {source}'s caption has {len(text)} characters, more than "
                                      f"pathflip.max_caption_chars ({max_chars})")
    else:
        status, reason = "ok", None
    return {"slide_id": slide_id, "caption": text if status == "ok" else None, "source": source,
            "status": status, "reason": reason, "n_chars": len(text)}


def slide_captions(table: pd.DataFrame, caption_file: pd.DataFrame | None, max_chars: int) -> pd.DataFrame:
    """One row per slide of ``table`` (the slide table, indexed by slide_id) and per row of
    ``caption_file`` whose slide is not in it; see the module docstring."""
    from_file = dict(zip(caption_file["slide_id"], caption_file["caption"])) if caption_file is not None else {}
    column = table["caption"] if "caption" in table.columns else None
    rows = []
    for sid in table.index:
        if sid in from_file:
            rows.append(_row(sid, from_file[sid], "file", max_chars))
        elif column is not None and isinstance(column[sid], str):
            rows.append(_row(sid, column[sid], "table", max_chars))
        else:
            rows.append(_row(sid, None, "none", max_chars))
    for sid in from_file:
        if sid not in table.index:
            rows.append({"slide_id": sid, "caption": None, "source": "file", "status": "not_in_slide_table",
                         "reason": "the caption file names a slide that is not in the slide table",
                         "n_chars": len(str(from_file[sid]))})
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype({"slide_id": "string", "caption": "string", "source": "string", "status": "string",
                      "reason": "string", "n_chars": "int64"})
