"""Reading a slide's patches in DataLoader workers, as the tile manifest defines them.

Each worker opens its own OpenSlide handle on first use (a handle must never cross a
fork). Two ways to read (config ``features.read``):

- ``manifest`` (default): the level-0 box ``(x, y, size)`` from pyramid level ``read_level``
  resized to ``patch_px`` (the patch exactly as every stage sees it, see
  ``mrplip_core.wsi.records.read_patch_image``), then resized to the encoder's ``input_px``;
- ``pyramid``: the same level-0 box read straight at ``input_px`` from the coarsest level at
  or above that resolution (Slide.read_region's own choice). Same tissue, far fewer pixels
  decoded (a 512 px patch for a 224 px encoder is read from a level up to 4x coarser), but
  not bit-identical to resizing the 512 px patch.

Shared reads (``manifest`` mode): a child patch read from the same pyramid level as one of
its ancestors lies inside the ancestor's read (a 40x patch inside its 20x parent, both from
level 0; on a one-level slide every patch of a bag inside the bag's root). Decoding the
slide is most of the cost, so a worker keeps the ancestor's pixels at level resolution and
crops the child from them instead of decoding the same tiles again. Only where the crop is
the same pixels as a read of the child: the level's downsample is a whole number and both
boxes start on its grid, in a format of plain tile grids (then OpenSlide copies whole
pixels, no resampling; ``SHARED_READ_VENDORS``). The crop then
goes through the same resize as :meth:`Slide.read_rect`, so the patch is bit-identical.

Items are uint8 HWC tensors: the float conversion and normalisation happen on the model's device.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from mrplip_core.encoders.image import resize_patch
from mrplip_core.wsi.slide import Slide, resize_level_pixels

_GEOMETRY = ("x", "y", "size", "patch_px", "read_level")

ReadMode = Literal["manifest", "pyramid"]
READ_MODES: tuple[str, ...] = ("manifest", "pyramid")

#: Level pixels a worker keeps for shared reads. A region is dropped once its last child is
#: read; a bag of 512 px patches down to 40x holds at most its 16 20x parents (3 MiB each).
REGION_CACHE_BYTES = 128 * 2**20

#: OpenSlide vendors whose levels are plain grids of whole-pixel tiles, so a read is a copy of
#: level pixels (checked by tests/test_features.py on an SVS and a generic pyramidal TIFF).
#: Other formats (some have overlapping or sub-pixel tile positions: MIRAX, Hamamatsu VMS,
#: Ventana, Zeiss) have their patches read alone until checked the same way.
SHARED_READ_VENDORS = frozenset({"aperio", "generic-tiff"})


class PatchDataset(Dataset):
    """Patches of one slide, item ``i`` = manifest row ``i``: ``(i, uint8 (input_px, input_px, 3))``.

    Parameters
    ----------
    slide_path: the slide file (the tiles stage's record ``path``).
    slide_id: for error messages.
    mpp: the resolved level-0 um/px of the record (so the slide opens exactly as tiled).
    manifest: rows of ``results/tiles/{slide}.parquet`` (columns x, y, size, patch_px, read_level;
        with patch_id and parent_id, children share their ancestors' reads).
    input_px: side of the encoder input.
    read: "manifest" or "pyramid" (see the module docstring).
    cache_bytes: level pixels each worker keeps for shared reads (0: every patch read alone).
    """

    def __init__(
        self,
        slide_path: str | Path,
        slide_id: str,
        mpp: float,
        manifest: pd.DataFrame,
        input_px: int,
        read: ReadMode = "manifest",
        cache_bytes: int = REGION_CACHE_BYTES,
    ) -> None:
        if read not in READ_MODES:
            raise ValueError(f"unknown read mode {read!r}; expected one of {READ_MODES}")
        self.slide_path = str(slide_path)
        self.slide_id = slide_id
        self.mpp = float(mpp)
        self.geometry = manifest.loc[:, list(_GEOMETRY)].to_numpy(np.int64)
        self.input_px = int(input_px)
        self.read_mode = read
        self.parents = _parent_rows(manifest)
        self.cache_bytes = int(cache_bytes)
        self._slide: Slide | None = None
        self._pid: int | None = None
        self._sources: np.ndarray | None = None  # per row: the row whose level read it is cropped from
        self._waiting: np.ndarray | None = None  # per row: its dependents not yet read in this process
        self._regions: OrderedDict[int, np.ndarray] = OrderedDict()  # row -> RGB at level resolution

    def __len__(self) -> int:
        return len(self.geometry)

    def _open(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():  # first use in this process
            self._slide = Slide(self.slide_path, self.slide_id, mpp=self.mpp)
            self._pid = os.getpid()
            self._regions = OrderedDict()
            self._sources = None
        return self._slide

    def read(self, i: int) -> np.ndarray:
        """Patch ``i`` at its manifest size ``patch_px`` (RGB uint8), before the encoder resize.

        Bit-identical to ``Slide.read_region(x, y, size, patch_px, level=read_level)``.
        """
        return np.ascontiguousarray(self._patch(i))

    def _patch(self, i: int) -> np.ndarray:
        """:meth:`read`, possibly a view into a kept region (no copy before the encoder resize)."""
        x, y, size, patch_px, level = (int(v) for v in self.geometry[i])
        slide = self._open()
        if self.cache_bytes <= 0:
            return slide.read_region(x, y, size, patch_px, level=level)
        sources = self._shared_sources(slide)
        src = int(sources[i])
        assert self._waiting is not None
        if src == i and self._waiting[i] == 0:  # nothing is cropped from it
            return slide.read_region(x, y, size, patch_px, level=level)
        d = int(slide.info.level_downsamples[level])  # whole number wherever src != i
        lw = max(1, math.ceil(size / slide.info.level_downsamples[level]))
        if src == i:
            pixels = slide.read_rect(x, y, size, size, lw, lw, level=level)  # level resolution, not resized
            self._keep(i, pixels)
        else:
            region = self._regions.get(src)
            if region is None:  # its source was read by another worker (or evicted): read alone
                return slide.read_region(x, y, size, patch_px, level=level)
            self._regions.move_to_end(src)
            sx, sy = (int(v) for v in self.geometry[src, :2])
            ox, oy = (x - sx) // d, (y - sy) // d
            pixels = region[oy : oy + lw, ox : ox + lw]
            self._waiting[src] -= 1
            if self._waiting[src] <= 0:
                del self._regions[src]
        return resize_level_pixels(pixels, patch_px, patch_px)

    def encoder_input(self, i: int) -> np.ndarray:
        """Patch ``i`` as the encoder sees it: RGB uint8 (input_px, input_px, 3)."""
        if self.read_mode == "pyramid":
            x, y, size = (int(v) for v in self.geometry[i, :3])
            return self._open().read_region(x, y, size, self.input_px)
        return resize_patch(self._patch(i), self.input_px)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.from_numpy(np.ascontiguousarray(self.encoder_input(i)))

    def _shared_sources(self, slide: Slide) -> np.ndarray:
        """Per row, the row whose level read contains it (itself when none); counts dependents."""
        if self._sources is None:
            if slide.info.vendor in SHARED_READ_VENDORS:
                self._sources = _shared_sources(self.geometry, self.parents, slide.info.level_downsamples)
            else:
                self._sources = np.arange(len(self.geometry), dtype=np.int64)
            n = len(self._sources)
            self._waiting = np.bincount(self._sources, minlength=n) - 1  # each row is its own source once
            self._waiting[self._sources != np.arange(n)] = 0
        return self._sources

    def _keep(self, i: int, pixels: np.ndarray) -> None:
        self._regions[i] = pixels
        used = sum(r.nbytes for r in self._regions.values())
        while used > self.cache_bytes and len(self._regions) > 1:
            _, old = self._regions.popitem(last=False)
            used -= old.nbytes

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None
        self._regions = OrderedDict()
        self._sources = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slide"], state["_pid"] = None, None  # handles never travel to workers
        state["_sources"], state["_waiting"], state["_regions"] = None, None, OrderedDict()
        return state


def _parent_rows(manifest: pd.DataFrame) -> np.ndarray:
    """Row of each row's parent patch (-1: a bag root, or no patch_id/parent_id columns)."""
    n = len(manifest)
    if not {"patch_id", "parent_id"} <= set(manifest.columns):
        return np.full(n, -1, dtype=np.int64)
    row_of = {pid: i for i, pid in enumerate(manifest["patch_id"].tolist())}
    return np.array([row_of.get(p, -1) if isinstance(p, str) else -1 for p in manifest["parent_id"].tolist()],
                    dtype=np.int64)


def _shared_sources(geometry: np.ndarray, parents: np.ndarray, downsamples: tuple[float, ...]) -> np.ndarray:
    """Per row, its farthest ancestor whose level read holds the row's exact pixels (itself if none).

    A read of box ``(x, y, size)`` at a level with downsample ``d`` covers level pixels
    ``x / d ..`` (``ceil(size / d)`` of them); a child's read is a crop of an ancestor's when
    both are at the same level, ``d`` is a whole number, both boxes start on multiples of
    ``d``, and the child's pixels lie inside the ancestor's.
    """
    n = len(geometry)
    sources = np.full(n, -1, dtype=np.int64)

    def holds(a: int, b: int) -> bool:
        xa, ya, sa, _, la = (int(v) for v in geometry[a])
        xb, yb, sb, _, lb = (int(v) for v in geometry[b])
        ds = float(downsamples[la]) if 0 <= la < len(downsamples) else 0.0
        if la != lb or ds < 1 or not ds.is_integer():
            return False
        d = int(ds)
        if xa % d or ya % d or xb % d or yb % d or xb < xa or yb < ya:
            return False
        wa, wb = max(1, math.ceil(sa / ds)), max(1, math.ceil(sb / ds))
        return (xb - xa) // d + wb <= wa and (yb - ya) // d + wb <= wa

    def source(i: int, depth: int = 0) -> int:
        if sources[i] < 0:
            p = int(parents[i])
            best = i
            if p >= 0 and p != i and depth < 64:
                sp = source(p, depth + 1)
                best = sp if holds(sp, i) else (p if holds(p, i) else i)
            sources[i] = best
        return int(sources[i])

    for i in range(n):
        source(i)
    return sources


def _worker_init(_: int) -> None:
    """One torch thread per worker: parallelism comes from the worker count.

    OpenCV's thread count is deliberately left alone: ``cv2.setNumThreads`` in a forked
    child whose parent had used OpenCV's pool waits forever on the parent's threads.
    """
    torch.set_num_threads(1)


def patch_loader(dataset: PatchDataset, *, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """In-order batches ``(indices, uint8 (B, H, W, 3))``; workers prefetch 4 batches each."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        drop_last=False,
    )
