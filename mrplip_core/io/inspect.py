"""Summaries of pipeline artifacts for a person: Parquet tables and HDF5 feature files."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

#: Marks a value cut to fit (as polars' tables do).
ELLIPSIS = "\u2026"
#: Columns are not cut narrower than this: columns from the middle are left out instead.
MIN_COLUMN_WIDTH = 12
#: Spaces between two table columns.
GAP = 2


def describe(path: str | Path, n_rows: int = 5, *, full: bool = False, width: int | None = None) -> str:
    """Human-readable summary of a Parquet (.parquet) or HDF5 (.h5/.hdf5) artifact.

    Parquet: row count, columns with types, file metadata, and ``n_rows`` sample rows: a
    table ``width`` characters wide (default: the terminal's), long values cut with an
    ellipsis and, when even that cannot fit, middle columns left out; ``full``: each sample
    row one field per line with whole values.
    HDF5: every group and dataset with shape and dtype, all attrs, and the first
    ``n_rows`` entries of each dataset.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such artifact: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _describe_parquet(path, n_rows, full, width or shutil.get_terminal_size().columns)
    if suffix in {".h5", ".hdf5"}:
        return _describe_hdf5(path, n_rows)
    raise ValueError(f"{path}: cannot inspect {suffix or 'files without suffix'} (expected .parquet, .h5 or .hdf5)")


def _describe_parquet(path: Path, n_rows: int, full: bool, width: int) -> str:
    pf = pq.ParquetFile(path)
    lines = [f"{path}  (Parquet)", f"rows: {pf.metadata.num_rows}", "columns:"]
    for fld in pf.schema_arrow:
        lines.append(f"  {fld.name}: {fld.type}")
    meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items() if k != b"pandas"}
    if meta:
        lines.append("metadata:")
        lines += [f"  {k}: {v}" if full else _cut(f"  {k}: {_one_line(v)}", width) for k, v in meta.items()]
    if pf.metadata.num_rows:
        head = pf.read_row_group(0).slice(0, n_rows).to_pandas()
        lines += ["sample rows:", *(_records(head) if full else _table(head, width))]
    lines += _slides_not_ok(path, pf.schema_arrow.names)
    return "\n".join(lines)


def _slides_not_ok(path: Path, names: list[str]) -> list[str]:
    """For a slides table (slide_id, status, error, reason): one line per slide whose status
    is not ok, with its error or reason whole (never cut), whether or not it is among the
    sample rows."""
    if not {"slide_id", "status", "error", "reason"} <= set(names):
        return []
    df = pd.read_parquet(path, columns=["slide_id", "status", "error", "reason"])
    bad = df[df["status"].astype("string") != "ok"]
    if bad.empty:
        return []
    lines = [f"slides not ok: {len(bad)} of {len(df)}"]
    for sid, status, error, reason in bad.itertuples(index=False):
        why = error if isinstance(error, str) else reason if isinstance(reason, str) else ""
        lines.append(_one_line(f"  {sid} [{status}]: {why}"))
    return lines


def _table(df: pd.DataFrame, width: int) -> list[str]:
    """``df`` as a table at most ``width`` characters wide, the way polars prints one: values
    cut with an ellipsis, middle columns left out behind an ellipsis column when the rest
    would be too narrow (see :func:`_plan_columns`)."""
    names = [str(c) for c in df.columns]
    cells = [[_text(v) for v in df[c]] for c in df.columns]
    numeric = [df[c].dtype.kind in "iuf" for c in df.columns]
    shown, widths = _plan_columns([max([len(n), *map(len, col)]) for n, col in zip(names, cells)], width)

    def row(values: list[str]) -> str:
        parts = []
        for i, text in zip(shown, values):
            text = _cut(text, widths[i])
            parts.append(text.rjust(widths[i]) if i >= 0 and numeric[i] else text.ljust(widths[i]))
        return (" " * GAP).join(parts).rstrip()

    out = [row([names[i] if i >= 0 else ELLIPSIS for i in shown]),
           row(["-" * widths[i] if i >= 0 else ELLIPSIS for i in shown])]
    out += [row([cells[i][r] if i >= 0 else ELLIPSIS for i in shown]) for r in range(len(df))]
    left_out = len(names) - len([i for i in shown if i >= 0])
    cut = any(len(t) > widths[i] for i in shown if i >= 0 for t in [names[i], *cells[i]])
    if left_out or cut:
        what = [f"{left_out} columns left out" if left_out else "", "long values cut" if cut else ""]
        out.append(f"({', '.join(w for w in what if w)}: --full prints every field whole)")
    return out


def _plan_columns(natural: list[int], width: int) -> tuple[list[int], dict[int, int]]:
    """Which columns a table ``width`` characters wide shows (-1: the ellipsis column standing
    for those left out) and how wide each is, given each column's ``natural`` width.

    The first column names the row (patch_id, slide_id, bag_id): it stays whole when it takes
    at most a third of the width. Of the others, as many as can each get MIN_COLUMN_WIDTH (or
    their own width, if narrower) are shown, taken from both ends inwards; they share the
    width fairly: narrow ones whole, the wide ones all cut to the same width.
    """
    first = natural[0] if len(natural) > 1 and natural[0] <= width // 3 else 0
    room = width - (first + GAP if first else 0)  # for the other columns
    others = list(range(1 if first else 0, len(natural)))
    need = {i: min(natural[i], MIN_COLUMN_WIDTH) for i in others}
    if sum(need.values()) + GAP * (len(others) - 1) > room:
        left: list[int] = []
        right: list[int] = []
        for k in range(len(others)):
            i = others[k // 2] if k % 2 == 0 else others[-1 - k // 2]
            if sum(need[j] for j in [*left, *right, i]) + GAP * (len(left) + len(right) + 1) + 1 > room:
                break
            (left if k % 2 == 0 else right).append(i)
        others = (left or others[:1]) + [-1] + right[::-1]
    budget = room - GAP * (len(others) - 1) - (1 if -1 in others else 0)
    rest = {i: natural[i] for i in others if i >= 0}
    cap = max(rest.values(), default=0)
    while cap > 1 and sum(min(w, cap) for w in rest.values()) > budget:
        cap -= 1
    widths = {i: min(w, cap) for i, w in rest.items()} | {-1: 1} | ({0: first} if first else {})
    return ([0] if first else []) + others, widths


def _records(df: pd.DataFrame) -> list[str]:
    """Each row one field per line, values whole (continuation lines indented)."""
    out = []
    for r in range(len(df)):
        out.append(f"[{r}]")
        for c in df.columns:
            text = _text(df[c].iloc[r], one_line=False).replace("\n", "\n    ")
            out.append(f"  {c}: {text}")
    return out


def _text(value: Any, one_line: bool = True) -> str:
    """A cell as text: null for missing values, floats to 6 significant digits."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "null"
    if isinstance(value, (float, np.floating)):
        text = f"{value:.6g}"
    elif isinstance(value, (bytes, bytearray)):
        text = f"<{len(value)} bytes>"
    else:
        text = str(value)
    return _one_line(text) if one_line else text


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "\u21b5").replace("\t", " ")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + ELLIPSIS


def _describe_hdf5(path: Path, n_rows: int) -> str:
    lines = [f"{path}  (HDF5)"]

    def attrs(obj: h5py.HLObject, indent: str) -> None:
        for k, v in obj.attrs.items():
            v = v.decode() if isinstance(v, bytes) else v
            lines.append(f"{indent}@{k} = {v!r}"[:300])

    def visit(name: str, obj: h5py.HLObject) -> None:
        depth = name.count("/") + 1
        indent = "  " * depth
        if isinstance(obj, h5py.Dataset):
            lines.append(f"{indent}{name.split('/')[-1]}: dataset {obj.shape} {obj.dtype}")
            attrs(obj, indent + "  ")
            if obj.shape and obj.shape[0]:
                sample = obj[: min(n_rows, obj.shape[0])]
                if sample.dtype.kind in "SO":
                    sample = [s.decode() if isinstance(s, bytes) else s for s in sample]
                    lines.append(f"{indent}  first: {sample}")
                else:
                    with np.printoptions(precision=4, threshold=40, edgeitems=3):
                        lines.append(f"{indent}  first: {np.array2string(np.asarray(sample), prefix=indent)}")
        else:
            lines.append(f"{indent}{name.split('/')[-1]}/: group")
            attrs(obj, indent + "  ")

    with h5py.File(path, "r") as f:
        attrs(f, "  ")
        f.visititems(visit)
    return "\n".join(lines)
