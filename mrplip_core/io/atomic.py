"""Atomic file writes: write to a temporary name in the same folder, then rename.

A killed job therefore never leaves a file at the final path that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

#: errno values whose error is raised again naming the file being written (its final path).
_NAMED_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary name keeps the suffix (so writers that dispatch on it still work) and
    starts with ``.`` plus the final name, so it is easy to recognise and never matches
    a Snakemake output pattern. On any exception the temporary file is removed; a full disk
    (ENOSPC, EDQUOT) or an I/O error (EIO) is raised again as an OSError with the same errno
    whose message names ``path``, since the writer's own message often names no file.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        code = _named_errno(exc)
        if code is not None and str(final) not in str(exc):
            # a full disk or an I/O error seen by a writer (pyarrow, h5py) often names no file
            raise OSError(code, f"{os.strerror(code)}: writing {final} ({exc})") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: The names :func:`atomic_path` gives its temporary files (``.{final name}.{random}.tmp{suffix}``).
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^.]+)?$")


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` and below it (the names
    :func:`atomic_path` gives them); returns them. Call it only from the one job that writes
    there (a folder of pictures of one report, not a folder that parallel jobs write into)."""
    removed = []
    for p in Path(folder).rglob(".*.tmp*"):
        if p.is_file() and TEMP_NAME.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _named_errno(exc: OSError) -> int | None:
    """The errno of ``exc`` when it is one of ``_NAMED_ERRNOS``, by number or by its words
    (pyarrow and h5py put "No space left on device" in the text and may leave errno unset)."""
    if exc.errno in _NAMED_ERRNOS:
        return exc.errno
    return next((e for e in sorted(_NAMED_ERRNOS) if os.strerror(e) in str(exc)), None)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_parquet(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` to Parquet atomically (no index); return the final path."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` (UTF-8) atomically; return the final path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
