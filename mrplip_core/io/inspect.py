"""Summaries of pipeline artifacts for a person: Parquet tables and HDF5 feature files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq


def describe(path: str | Path, n_rows: int = 5) -> str:
    """Human-readable summary of a Parquet (.parquet) or HDF5 (.h5/.hdf5) artifact.

    Parquet: row count, columns with types, file metadata, and ``n_rows`` sample rows.
    HDF5: every group and dataset with shape and dtype, all attrs, and the first
    ``n_rows`` entries of each dataset.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such artifact: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _describe_parquet(path, n_rows)
    if suffix in {".h5", ".hdf5"}:
        return _describe_hdf5(path, n_rows)
    raise ValueError(f"{path}: cannot inspect {suffix or 'files without suffix'} (expected .parquet, .h5 or .hdf5)")


def _describe_parquet(path: Path, n_rows: int) -> str:
    pf = pq.ParquetFile(path)
    lines = [f"{path}  (Parquet)", f"rows: {pf.metadata.num_rows}", "columns:"]
    for fld in pf.schema_arrow:
        lines.append(f"  {fld.name}: {fld.type}")
    meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items() if k != b"pandas"}
    if meta:
        lines.append("metadata:")
        lines += [f"  {k}: {v[:200]}" for k, v in meta.items()]
    if pf.metadata.num_rows:
        head = pf.read_row_group(0).slice(0, n_rows).to_pandas()
        with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_colwidth", 60):
            lines += ["sample rows:", head.to_string(index=False)]
    return "\n".join(lines)


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
