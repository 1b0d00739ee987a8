"""Resumable caption storage: part files as results arrive, one atomic Parquet at the end.

Layout for a slide whose final artifact is ``results/captions/{slide}.parquet``::

    results/captions/{slide}.parts/part-000000.parquet
    results/captions/{slide}.parts/part-000001.parquet
    ...

Each part is written to a temporary name, fsynced and renamed, so a job killed at any
moment leaves only complete parts (plus at most one ``.part-*.tmp`` file, ignored and
removed on the next start). Every part carries the settings digest
(:meth:`CaptionSettings.digest`) in its Parquet metadata; parts made under other settings
(another model, prompt or generation parameters) are stale and deleted on resume.

A restarted job reads the parts, skips patch ids already captioned (and, unless
``retry_errors`` is off, requests again those recorded with an error), and appends new
parts. :func:`finalize` merges them into the final file atomically and hard-links that file
into the folder as ``final.parquet`` (the same inode: no extra space), itself a valid part with
the settings digest; once the whole job has succeeded the other parts are removed
(:func:`prune_parts`) and ``final.parquet`` stays. Snakemake deletes the output of a job it
did not see finish (a job killed after its last write, rerun with ``--rerun-incomplete``) and
of a failed multi-slide job; the link survives that, so the rerun rebuilds the file without a
single request. To request a slide's captions again, delete its ``.parts/`` folder too.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import Executor, Future
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mrplip_core.captions.schema import CAPTION_ARROW_SCHEMA, CAPTION_COLUMNS, empty_captions
from mrplip_core.io.atomic import atomic_path

log = logging.getLogger(__name__)

DIGEST_KEY = b"mrplip.captions.digest"
#: The final file's hard link inside the parts folder (read as a part; kept after the job).
FINAL_LINK = "final.parquet"


def parts_dir(out: str | os.PathLike[str]) -> Path:
    """The part-file folder beside a final captions Parquet (``X.parquet`` -> ``X.parts/``)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".parquet") + ".parts")


class PartWriter:
    """Buffers caption rows of one slide and writes them as part files.

    Parameters
    ----------
    folder: the slide's ``.parts`` folder (created on the first write).
    digest: settings digest stored in every part.
    flush_rows / flush_seconds: a part is written when this many rows are buffered, or when
        a row arrives this long after the last write.
    executor: where part files are written (a single-worker executor keeps them in order and
        off the caller's thread, e.g. an asyncio event loop); None writes inline.
    """

    def __init__(
        self,
        folder: Path,
        digest: str,
        flush_rows: int = 256,
        flush_seconds: float = 60.0,
        executor: Executor | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.digest = digest
        self.flush_rows = max(1, int(flush_rows))
        self.flush_seconds = float(flush_seconds)
        self.executor = executor
        self.futures: list[Future] = []
        self._rows: list[dict[str, str | None]] = []
        self._next = _next_index(self.folder)
        self._last_flush = time.monotonic()

    def add(self, row: dict[str, str | None]) -> None:
        """Buffer one row (keys: CAPTION_COLUMNS); writes a part when a threshold is reached."""
        self._rows.append(row)
        if len(self._rows) >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as the next part file (no-op when nothing is buffered)."""
        self._last_flush = time.monotonic()
        if not self._rows:
            return
        rows, index = self._rows, self._next
        self._rows, self._next = [], self._next + 1
        if self.executor is None:
            self._write(rows, index)
        else:
            self.futures.append(self.executor.submit(self._write, rows, index))

    def _write(self, rows: list[dict[str, str | None]], index: int) -> None:
        table = pa.Table.from_pylist(rows, schema=CAPTION_ARROW_SCHEMA)
        table = table.replace_schema_metadata({DIGEST_KEY: self.digest.encode()})
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"part-{index:06d}.parquet"
        tmp = self.folder / f".part-{index:06d}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.folder)


def _next_index(folder: Path) -> int:
    idx = [int(p.stem.split("-")[1]) for p in folder.glob("part-*.parquet")] if folder.is_dir() else []
    return max(idx) + 1 if idx else 0


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_parts(folder: Path, digest: str) -> pd.DataFrame:
    """Rows of all valid parts in ``folder`` (part order); stale or broken parts are deleted.

    A part is stale when its digest differs from ``digest``; broken when Parquet cannot read
    it (it cannot be, as parts are renamed into place only when complete, but a disk error
    should cost a re-request, not the job). Temporary files of a killed writer are removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return empty_captions()
    for tmp in folder.glob(".part-*.tmp"):
        tmp.unlink(missing_ok=True)
    for tmp in folder.glob(f".{FINAL_LINK}.tmp"):
        tmp.unlink(missing_ok=True)
    frames = []
    final = [folder / FINAL_LINK] if (folder / FINAL_LINK).exists() else []
    for part in final + sorted(folder.glob("part-*.parquet")):
        try:
            meta = pq.read_schema(part).metadata or {}
            if meta.get(DIGEST_KEY, b"").decode() != digest:
                log.warning("%s: made with other caption settings; deleting it", part)
                part.unlink()
                continue
            frames.append(pq.read_table(part).to_pandas())
        except (OSError, pa.ArrowInvalid) as exc:
            log.warning("%s: unreadable (%s); deleting it, its patches will be captioned again", part, exc)
            part.unlink(missing_ok=True)
    if not frames:
        return empty_captions()
    return pd.concat(frames, ignore_index=True).astype(CAPTION_COLUMNS)


def settled_patch_ids(done: pd.DataFrame, retry_errors: bool = True) -> set[str]:
    """Patch ids that need no new request: captioned, or (without ``retry_errors``) failed."""
    if done.empty:
        return set()
    ok = done["error"].isna()
    return set(done.loc[ok if retry_errors else slice(None), "patch_id"])


def merge_rows(done: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """One row per patch of ``order``: the first successful row, else the last failed one.

    Raises ValueError naming how many and which patches have no row at all.
    """
    if done.empty:
        merged = empty_captions()
    else:
        d = done.copy()
        d["_ok"] = d["error"].isna()
        d["_seq"] = range(len(d))
        # ok rows first (earliest), then failed rows (latest)
        d["_rank"] = d["_seq"].where(d["_ok"], -d["_seq"] + len(d) * 2)
        merged = d.sort_values("_rank").drop_duplicates("patch_id", keep="first")
        merged = merged.drop(columns=["_ok", "_seq", "_rank"])
    wanted = pd.Index(order)
    missing = wanted.difference(pd.Index(merged["patch_id"]))
    if len(missing):
        raise ValueError(f"{len(missing)} patches have no caption row, e.g. {list(missing[:3])}")
    merged = merged.set_index("patch_id").loc[list(order)].reset_index()
    return merged[list(CAPTION_COLUMNS)].astype(CAPTION_COLUMNS)


def finalize(
    out: str | os.PathLike[str], order: list[str], digest: str, max_error_fraction: float = 0.0, keep_parts: bool = False
) -> pd.DataFrame:
    """Merge the slide's parts into ``out`` (atomic) and link it into the parts folder as
    ``final.parquet``; then delete the other parts (unless ``keep_parts``).

    ``order`` is the manifest's patch ids: the final file has exactly one row for each, in
    that order. When more than ``max_error_fraction`` of them failed, nothing is written,
    the parts are kept (a rerun requests the failed ones again) and RuntimeError is raised.
    """
    folder = parts_dir(out)
    merged = merge_rows(read_parts(folder, digest), order)
    n_err = int(merged["error"].notna().sum())
    if order and n_err / len(order) > max_error_fraction:
        first = merged.loc[merged["error"].notna(), ["patch_id", "error"]].head(3).to_dict("records")
        raise RuntimeError(
            f"{n_err} of {len(order)} patches failed (captions.max_error_fraction is {max_error_fraction}); "
            f"parts kept in {folder}, a rerun requests the failed ones again. First errors: {first}"
        )
    table = pa.Table.from_pandas(merged, schema=CAPTION_ARROW_SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), DIGEST_KEY: digest.encode()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    _link_final(Path(out), folder)
    if not keep_parts:
        prune_parts(folder)
    return merged


def _link_final(out: Path, folder: Path) -> None:
    """Hard-link ``out`` into ``folder`` as ``final.parquet`` (atomically; a copy where the file
    system has no hard links)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{FINAL_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(out, tmp)
    except OSError:
        shutil.copyfile(out, tmp)
    os.replace(tmp, folder / FINAL_LINK)
    _fsync_dir(folder)


def prune_parts(folder: str | os.PathLike[str]) -> None:
    """Delete a finished slide's part files, keeping ``final.parquet`` (and the folder) when it
    exists; a folder without it is removed whole."""
    folder = Path(folder)
    if not (folder / FINAL_LINK).exists():
        shutil.rmtree(folder, ignore_errors=True)
        return
    for p in folder.iterdir():
        if p.name != FINAL_LINK:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
