"""The corpus index: one row per (slide, bag), built from the tile manifests.

The index is the only corpus-wide structure held in memory: 20,000 slides x 20 bags is
400,000 short rows. Everything per patch (features, captions, keywords) stays in the
per-slide files and is read lazily by :class:`mrplip_core.data.slide.SlideStore`.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mrplip_core.data.settings import CorpusPaths

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("slide_id", "bag_id", "split")


def slide_split(slide_id: str, val_fraction: float, seed: int) -> str:
    """'train' or 'val' for one slide: a seeded hash, so a slide keeps its split when
    slides are added to or removed from the cohort."""
    if val_fraction <= 0:
        return "train"
    u = zlib.crc32(f"{seed}:{slide_id}".encode()) / 2**32
    return "val" if u < val_fraction else "train"


def usable_slides(paths: CorpusPaths) -> list[str]:
    """Slide ids with ``status == 'ok'`` in ``results/slides.parquet``, sorted."""
    slides = pd.read_parquet(paths.slides, columns=["slide_id", "status"])
    return sorted(slides.loc[slides["status"] == "ok", "slide_id"].astype(str))


def _slide_bags(paths: CorpusPaths, slide_id: str, magnifications: Sequence[float]) -> tuple[list[str], str, int | None]:
    """(bag ids with at least one patch at a configured magnification, reason if skipped,
    width of its image features or None).

    Raises ``OSError`` when the image features file cannot be read as HDF5 (truncated,
    overwritten) and ``ValueError`` when it was made by another encoder than
    ``paths.image_encoder`` or its features are not as wide as its ``dim`` attr says; each
    message names the slide and the file and says to delete it and rerun the features stage.
    """
    files = paths.slide_files(slide_id)
    missing = [f"{name} ({path})" for name, path in files.items() if not path.exists()]
    if missing:
        raise FileNotFoundError(f"slide {slide_id!r} is 'ok' but has no {', '.join(missing)}")
    path = files["image_features"]
    redo = "delete it and rerun `snakemake features`"
    try:
        with h5py.File(path, "r") as f:
            status = str(f.attrs.get("status", "ok"))
            encoder = str(f.attrs.get("encoder", paths.image_encoder))
            dim = int(f.attrs["dim"]) if "dim" in f.attrs else None
            widths = {g: int(f[g]["features"].shape[1]) for g in f
                      if isinstance(f[g], h5py.Group) and "features" in f[g] and f[g]["features"].ndim == 2}
    except OSError as exc:
        raise OSError(f"slide {slide_id!r}: image features {path} cannot be read ({exc}); {redo}") from None
    if status != "ok":
        return [], f"image features status {status!r}", None
    if encoder != paths.image_encoder:
        raise ValueError(f"slide {slide_id!r}: image features {path} were made by encoder {encoder!r}, "
                         f"not the configured {paths.image_encoder!r}; {redo}")
    wrong = {g: w for g, w in widths.items() if dim is not None and w != dim}
    if wrong or len(set(widths.values())) > 1:
        raise ValueError(f"slide {slide_id!r}: image features {path} have widths {widths}, but encoder "
                         f"{encoder!r} gives {dim}-dim features; {redo}")
    table = pq.read_table(files["manifest"], columns=["bag_id", "magnification"])
    mags = np.asarray(table.column("magnification").to_numpy(zero_copy_only=False), dtype=np.float64)
    keep = np.isin(np.round(mags, 6), np.round(np.asarray(magnifications, dtype=np.float64), 6))
    bags = np.asarray(table.column("bag_id").to_numpy(zero_copy_only=False), dtype=object)[keep]
    width = next(iter(widths.values()), None)
    return sorted(set(map(str, bags))), "" if keep.any() else "no patch at a configured magnification", width


def build_bag_index(
    paths: CorpusPaths,
    magnifications: Sequence[float],
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    slide_ids: Iterable[str] | None = None,
    threads: int = 8,
) -> pd.DataFrame:
    """Index every bag of the usable slides.

    Parameters
    ----------
    paths: where the per-slide artifacts are.
    magnifications: the configured magnifications (x); bags without any patch at one of
        them are left out.
    val_fraction, split_seed: the slide-level split (see :func:`slide_split`).
    slide_ids: restrict to these slides (default: every 'ok' slide of slides.parquet).
    threads: manifests read in parallel (I/O bound).

    Returns
    -------
    DataFrame with columns slide_id, bag_id, split ('train' | 'val'), sorted by slide and
    bag, so the same files always give the same index.

    Raises
    ------
    OSError, ValueError: a usable slide's image features cannot be read (truncated HDF5),
        were made by another encoder, or are not as wide as the other slides' (a file of
        another encoder's dimension); the message names the slide and the file.
    """
    ids = sorted(slide_ids) if slide_ids is not None else usable_slides(paths)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda s: _slide_bags(paths, s, magnifications), ids))
    widths = {slide_id: width for slide_id, (_, _, width) in zip(ids, results) if width is not None}
    if len(set(widths.values())) > 1:
        common = max(set(widths.values()), key=list(widths.values()).count)
        odd = [s for s, w in widths.items() if w != common]
        raise ValueError(
            f"image features of encoder {paths.image_encoder!r} are {common}-dim for most slides but "
            f"{widths[odd[0]]}-dim for slide {odd[0]!r} ({paths.image_features(odd[0])})"
            + (f" and {len(odd) - 1} more" if len(odd) > 1 else "")
            + "; delete the odd files and rerun `snakemake features`"
        )
    rows: list[tuple[str, str, str]] = []
    for slide_id, (bags, reason, _) in zip(ids, results):
        if reason:
            log.warning("slide %s left out of pretraining: %s", slide_id, reason)
        split = slide_split(slide_id, val_fraction, split_seed)
        rows.extend((slide_id, bag, split) for bag in bags)
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    if len(index) and not (index["split"] == "train").any():
        raise ValueError(
            f"every slide of the corpus fell into the validation split (val_fraction={val_fraction}); "
            "lower pretrain.data.val_fraction or change split_seed"
        )
    return index
