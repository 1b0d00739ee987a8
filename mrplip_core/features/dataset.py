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

Shared reads (``manifest`` mode): a child patch whose pixels lie inside an ancestor's read
is cropped from it instead of decoded again (:mod:`mrplip_core.wsi.shared_reads`; each
worker keeps its own regions, bounded by ``cache_bytes``). Patches stay bit-identical to
``Slide.read_region``.

Items are uint8 HWC tensors: the float conversion and normalisation happen on the model's device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from mrplip_core.encoders.image import resize_patch
from mrplip_core.wsi.shared_reads import REGION_CACHE_BYTES, SharedReader, manifest_geometry, parent_rows
from mrplip_core.wsi.slide import Slide

ReadMode = Literal["manifest", "pyramid"]
READ_MODES: tuple[str, ...] = ("manifest", "pyramid")


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
        self.geometry = manifest_geometry(manifest)
        self.input_px = int(input_px)
        self.read_mode = read
        self.parents = parent_rows(manifest)
        self.cache_bytes = int(cache_bytes)
        #: rows per DataLoader batch (set by :func:`patch_loader`): tells a worker which rows it reads
        self.batch_size: int | None = None
        self._slide: Slide | None = None
        self._reader: SharedReader | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.geometry)

    def _open(self) -> SharedReader:
        if self._reader is None or self._pid != os.getpid():  # first use in this process
            self._slide = Slide(self.slide_path, self.slide_id, mpp=self.mpp)
            self._reader = SharedReader(self._slide, self.geometry, self.parents, cache_bytes=self.cache_bytes,
                                        wanted=self._worker_rows())
            self._pid = os.getpid()
        return self._reader

    def _worker_rows(self) -> np.ndarray | None:
        """The rows this DataLoader worker reads: batch ``k`` goes to worker ``k % num_workers``
        (the in-order loader's round robin). Only a hint for when to drop a kept region."""
        info = get_worker_info()
        if info is None or not self.batch_size or info.num_workers < 2:
            return None
        rows = np.arange(len(self.geometry))
        return rows[(rows // self.batch_size) % info.num_workers == info.id]

    def read(self, i: int) -> np.ndarray:
        """Patch ``i`` at its manifest size ``patch_px`` (RGB uint8), before the encoder resize.

        Bit-identical to ``Slide.read_region(x, y, size, patch_px, level=read_level)``.
        """
        return np.array(self._open().read(i))

    def encoder_input(self, i: int) -> np.ndarray:
        """Patch ``i`` as the encoder sees it: RGB uint8 (input_px, input_px, 3)."""
        reader = self._open()
        if self.read_mode == "pyramid":
            x, y, size = (int(v) for v in self.geometry[i, :3])
            return reader.slide.read_region(x, y, size, self.input_px)
        return resize_patch(reader.read(i), self.input_px)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.from_numpy(np.array(self.encoder_input(i)))

    @property
    def sources(self) -> np.ndarray:
        """Per row, the row whose level read it is cropped from (itself: read alone or a source)."""
        return self._open().sources

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide, self._reader, self._pid = None, None, None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slide"], state["_reader"], state["_pid"] = None, None, None  # handles never travel to workers
        return state


def _worker_init(_: int) -> None:
    """One torch thread per worker: parallelism comes from the worker count.

    OpenCV's thread count is deliberately left alone: ``cv2.setNumThreads`` in a forked
    child whose parent had used OpenCV's pool waits forever on the parent's threads.
    """
    torch.set_num_threads(1)


def patch_loader(dataset: PatchDataset, *, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """In-order batches ``(indices, uint8 (B, H, W, 3))``; workers prefetch 4 batches each."""
    dataset.batch_size = batch_size
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
