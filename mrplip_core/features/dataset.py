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

Items are uint8 HWC tensors: the float conversion and normalisation happen on the model's device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from mrplip_core.encoders.image import resize_patch
from mrplip_core.wsi.slide import Slide

_GEOMETRY = ("x", "y", "size", "patch_px", "read_level")

ReadMode = Literal["manifest", "pyramid"]
READ_MODES: tuple[str, ...] = ("manifest", "pyramid")


class PatchDataset(Dataset):
    """Patches of one slide, item ``i`` = manifest row ``i``: ``(i, uint8 (input_px, input_px, 3))``.

    Parameters
    ----------
    slide_path: the slide file (the tiles stage's record ``path``).
    slide_id: for error messages.
    mpp: the resolved level-0 um/px of the record (so the slide opens exactly as tiled).
    manifest: rows of ``results/tiles/{slide}.parquet`` (columns x, y, size, patch_px, read_level).
    input_px: side of the encoder input.
    read: "manifest" or "pyramid" (see the module docstring).
    """

    def __init__(
        self,
        slide_path: str | Path,
        slide_id: str,
        mpp: float,
        manifest: pd.DataFrame,
        input_px: int,
        read: ReadMode = "manifest",
    ) -> None:
        if read not in READ_MODES:
            raise ValueError(f"unknown read mode {read!r}; expected one of {READ_MODES}")
        self.slide_path = str(slide_path)
        self.slide_id = slide_id
        self.mpp = float(mpp)
        self.geometry = manifest.loc[:, list(_GEOMETRY)].to_numpy(np.int64)
        self.input_px = int(input_px)
        self.read_mode = read
        self._slide: Slide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.geometry)

    def _open(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():  # first use in this process
            self._slide = Slide(self.slide_path, self.slide_id, mpp=self.mpp)
            self._pid = os.getpid()
        return self._slide

    def read(self, i: int) -> np.ndarray:
        """Patch ``i`` at its manifest size ``patch_px`` (RGB uint8), before the encoder resize."""
        x, y, size, patch_px, level = (int(v) for v in self.geometry[i])
        return self._open().read_region(x, y, size, patch_px, level=level)

    def encoder_input(self, i: int) -> np.ndarray:
        """Patch ``i`` as the encoder sees it: RGB uint8 (input_px, input_px, 3)."""
        if self.read_mode == "pyramid":
            x, y, size = (int(v) for v in self.geometry[i, :3])
            return self._open().read_region(x, y, size, self.input_px)
        return resize_patch(self.read(i), self.input_px)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.from_numpy(self.encoder_input(i))

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slide"], state["_pid"] = None, None  # handles never travel to workers
        return state


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
