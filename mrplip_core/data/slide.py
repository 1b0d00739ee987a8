"""Lazy, per-worker access to one slide's artifacts.

:class:`SlideStore` keeps an LRU cache of :class:`SlideBags` (the slide's quad-tree, the
row of every patch in the feature file, captions and keyword rows: a few hundred KiB per
slide) and of open HDF5 handles. Handles are opened on first use *in the process that
uses them* (the cache is reset when the process id changes), so a store built in the
main process can be handed to forked DataLoader workers.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np
import pyarrow.parquet as pq

from mrplip_core.data.settings import CorpusPaths
from mrplip_core.wsi.magnification import format_magnification


@dataclass
class SlideBags:
    """One slide's patches at the configured magnifications, as arrays over its patches.

    Positions index the arrays below (not the manifest rows).
    """

    slide_id: str
    patch_ids: np.ndarray  # (n,) str
    level: np.ndarray  # (n,) int64, index into the configured magnifications
    ancestor: np.ndarray  # (n,) int64, position of the nearest configured ancestor, -1 for none
    feature_row: np.ndarray  # (n,) int64, row in the HDF5 group of the patch's magnification
    captions: np.ndarray  # (n,) str, "" where the captions file has none
    bags: dict[str, np.ndarray]  # bag_id -> positions of its patches
    keyword_rows: dict[str, np.ndarray]  # bag_id -> rows of /keywords/features
    groups: tuple[str, ...]  # HDF5 group name per configured magnification ("5x", ...)


def _column(table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=object)


def load_slide(paths: CorpusPaths, slide_id: str, magnifications: Sequence[float]) -> SlideBags:
    """Read one slide's manifest, feature row maps, captions and keyword rows.

    Raises KeyError naming the slide and patch when the feature file lacks a manifest
    patch (the artifacts disagree: rerun the features stage).
    """
    table = pq.read_table(paths.manifest(slide_id), columns=["patch_id", "parent_id", "bag_id", "magnification"])
    patch_ids = _column(table, "patch_id").astype(str)
    parents = _column(table, "parent_id")
    bag_ids = _column(table, "bag_id").astype(str)
    mags = np.asarray(table.column("magnification").to_numpy(zero_copy_only=False), dtype=np.float64)
    wanted = np.round(np.asarray(magnifications, dtype=np.float64), 6)
    level_all = np.full(len(patch_ids), -1, dtype=np.int64)
    for d, m in enumerate(wanted):
        level_all[np.round(mags, 6) == m] = d

    position = {p: i for i, p in enumerate(patch_ids)}
    parent_all = np.asarray([position.get(p, -1) if isinstance(p, str) else -1 for p in parents], dtype=np.int64)
    # nearest ancestor at a configured magnification, over the whole manifest
    ancestor_all = parent_all.copy()
    for _ in range(8):  # quad-tree depth is small; iterate until every pointer is configured or -1
        unconfigured = (ancestor_all >= 0) & (level_all[ancestor_all.clip(min=0)] < 0)
        if not unconfigured.any():
            break
        ancestor_all[unconfigured] = parent_all[ancestor_all[unconfigured]]

    keep = np.flatnonzero(level_all >= 0)
    new_pos = np.full(len(patch_ids), -1, dtype=np.int64)
    new_pos[keep] = np.arange(len(keep))
    ancestor = np.where(ancestor_all[keep] >= 0, new_pos[ancestor_all[keep].clip(min=0)], -1)
    level = level_all[keep]
    kept_ids = patch_ids[keep]

    groups = tuple(format_magnification(float(m)) for m in magnifications)
    feature_row = np.full(len(keep), -1, dtype=np.int64)
    with h5py.File(paths.image_features(slide_id), "r") as f:
        for d, group in enumerate(groups):
            at_level = np.flatnonzero(level == d)
            if not len(at_level):
                continue
            if group not in f:
                raise KeyError(f"{paths.image_features(slide_id)}: no group {group!r} but the manifest has "
                               f"{len(at_level)} patches at {group}")
            rows = {p: i for i, p in enumerate(f[group]["patch_ids"].asstr()[()])}
            for pos in at_level.tolist():
                row = rows.get(kept_ids[pos])
                if row is None:
                    raise KeyError(f"{paths.image_features(slide_id)}: patch {kept_ids[pos]!r} of the manifest "
                                   "has no features (rerun the features stage)")
                feature_row[pos] = row

    captions = np.full(len(keep), "", dtype=object)
    cap = pq.read_table(paths.captions(slide_id), columns=["patch_id", "caption"])
    cap_text = {p: c for p, c in zip(_column(cap, "patch_id"), _column(cap, "caption")) if isinstance(c, str)}
    for pos, pid in enumerate(kept_ids.tolist()):
        captions[pos] = cap_text.get(pid, "")

    bags: dict[str, list[int]] = {}
    for pos, bag in zip(range(len(keep)), bag_ids[keep].tolist()):
        bags.setdefault(bag, []).append(pos)
    keyword_rows: dict[str, list[int]] = {}
    with h5py.File(paths.text_features(slide_id), "r") as f:
        if "keywords" in f and "bag_id" in f["keywords"]:
            for row, bag in enumerate(f["keywords"]["bag_id"].asstr()[()]):
                keyword_rows.setdefault(bag, []).append(row)
    return SlideBags(
        slide_id=slide_id,
        patch_ids=kept_ids,
        level=level,
        ancestor=ancestor,
        feature_row=feature_row,
        captions=captions,
        bags={b: np.asarray(v, dtype=np.int64) for b, v in bags.items()},
        keyword_rows={b: np.asarray(v, dtype=np.int64) for b, v in keyword_rows.items()},
        groups=groups,
    )


def read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for any row order, repeats allowed (h5py needs increasing indices)."""
    if len(rows) == 0:
        return np.zeros((0, *dataset.shape[1:]), dtype=dataset.dtype)
    unique, inverse = np.unique(rows, return_inverse=True)
    if len(unique) > 1 and unique[-1] - unique[0] + 1 == len(unique):  # contiguous: one slice
        block = dataset[int(unique[0]) : int(unique[-1]) + 1]
    else:
        block = dataset[unique.tolist()]
    return block[inverse]


class SlideStore:
    """LRU caches of :class:`SlideBags` and open HDF5 files, valid in one process at a time."""

    def __init__(self, paths: CorpusPaths, magnifications: Sequence[float], cache_size: int = 64) -> None:
        self.paths = paths
        self.magnifications = tuple(float(m) for m in magnifications)
        self.cache_size = max(1, int(cache_size))
        self._pid = -1
        self._slides: OrderedDict[str, SlideBags] = OrderedDict()
        self._files: OrderedDict[str, h5py.File] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slides"], state["_files"], state["_pid"] = OrderedDict(), OrderedDict(), -1
        return state

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # a forked worker: never touch the parent's handles
            self._files = OrderedDict()
            self._slides = OrderedDict()
            self._pid = os.getpid()

    def slide(self, slide_id: str) -> SlideBags:
        self._check_process()
        if slide_id in self._slides:
            self._slides.move_to_end(slide_id)
            return self._slides[slide_id]
        bags = load_slide(self.paths, slide_id, self.magnifications)
        self._slides[slide_id] = bags
        if len(self._slides) > self.cache_size:
            self._slides.popitem(last=False)
        return bags

    def _file(self, path: str) -> h5py.File:
        self._check_process()
        if path in self._files:
            self._files.move_to_end(path)
            return self._files[path]
        handle = h5py.File(path, "r")
        self._files[path] = handle
        if len(self._files) > 2 * self.cache_size:
            _, old = self._files.popitem(last=False)
            old.close()
        return handle

    def image_features(self, slide: SlideBags, positions: np.ndarray) -> np.ndarray:
        """(len(positions), D) float16 features of the given patches, in that order."""
        f = self._file(str(self.paths.image_features(slide.slide_id)))
        levels = slide.level[positions]
        out: np.ndarray | None = None
        for d in np.unique(levels).tolist():
            at = np.flatnonzero(levels == d)
            block = read_rows(f[slide.groups[d]]["features"], slide.feature_row[positions[at]])
            if out is None:
                out = np.empty((len(positions), block.shape[1]), dtype=block.dtype)
            out[at] = block
        assert out is not None
        return out

    def keyword_features(self, slide: SlideBags, rows: np.ndarray) -> np.ndarray:
        """(len(rows), Dt) float16 keyword features."""
        f = self._file(str(self.paths.text_features(slide.slide_id)))
        return read_rows(f["keywords"]["features"], rows)

    def keyword_dim(self, slide_id: str) -> int:
        f = self._file(str(self.paths.text_features(slide_id)))
        return int(f["keywords"]["features"].shape[1])

    def image_dim(self, slide_id: str) -> int:
        slide = self.slide(slide_id)
        f = self._file(str(self.paths.image_features(slide_id)))
        return int(f[slide.groups[int(slide.level[0])]]["features"].shape[1])

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
