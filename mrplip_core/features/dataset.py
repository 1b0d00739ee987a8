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

A job's slides form one :class:`ShardPatches` read by one DataLoader: each worker task is a
chunk of whole bags of one slide (so a bag's shared reads stay in one process), and a slide
that cannot be read yields its error instead of pixels, without stopping the others.

Items are uint8 HWC tensors: the float conversion and normalisation happen on the model's device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import openslide
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from mrplip_core.encoders.image import resize_patch
from mrplip_core.io.errors import MACHINE_ERRNOS, MACHINE_WORDS, machine_trouble
from mrplip_core.wsi.shared_reads import REGION_CACHE_BYTES, SharedReader, manifest_geometry, parent_rows
from mrplip_core.wsi.slide import Slide, SlideError

ReadMode = Literal["manifest", "pyramid"]
READ_MODES: tuple[str, ...] = ("manifest", "pyramid")

#: Rows a DataLoader worker reads per task: whole bags, merged up to this many rows.
WORKER_ROWS = 96

#: errno values of an OSError that say nothing about the slide (the machine or the file
#: system is in trouble): the job fails and is retried instead of recording a failed slide.
TRANSIENT_ERRNOS = MACHINE_ERRNOS
#: The same in an error's text (``os.strerror``), and OpenCV's failed allocation.
TRANSIENT_WORDS = MACHINE_WORDS


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
        #: first row of each bag (consecutive rows with one bag_id): a worker reads whole bags
        self.bag_starts = _run_starts(manifest["bag_id"].to_numpy() if "bag_id" in manifest.columns else None,
                                      len(self.geometry))
        self._slide: Slide | None = None
        self._reader: SharedReader | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.geometry)

    def _open(self) -> SharedReader:
        if self._reader is None or self._pid != os.getpid():  # first use in this process
            self._slide = Slide(self.slide_path, self.slide_id, mpp=self.mpp)
            self._reader = SharedReader(self._slide, self.geometry, self.parents, cache_bytes=self.cache_bytes)
            self._pid = os.getpid()
        return self._reader

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

    def chunks(self, rows: int) -> list[tuple[int, int]]:
        """``(start, stop)`` row ranges of whole bags, consecutive bags merged up to ``rows`` rows.

        A bag is never split (a bag larger than ``rows`` is a chunk alone), so every read a
        bag's patches share happens in the one worker that reads the chunk.
        """
        starts = self.bag_starts.tolist() + [len(self)]
        out: list[tuple[int, int]] = []
        a = starts[0] if starts else 0
        for b, c in zip(starts[1:], starts[2:] + [None]):
            if c is None or c - a > rows:  # the next bag would not fit
                out.append((a, b))
                a = b
        return [(a, b) for a, b in out if b > a]

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


def _run_starts(bag_ids: np.ndarray | None, n: int, chunk: int = WORKER_ROWS) -> np.ndarray:
    """Row where each run of equal bag ids starts (no bag ids: every ``chunk`` rows)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if bag_ids is None:
        return np.arange(0, n, chunk, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], bag_ids[1:] != bag_ids[:-1]])).astype(np.int64)


class ShardPatches(Dataset):
    """The patches of several slides as one dataset: item ``g`` = ``(g, uint8 image, error)``.

    Row ``g`` is row ``g - offsets[k]`` of slide ``k``. One DataLoader runs over a whole shard,
    so its workers never stop at a slide boundary (a loader per slide would start its
    workers and wait for their first batches once per slide).

    With ``catch`` a slide that cannot be read (:func:`slide_failure`) gives zero images and
    the error, which names the slide; its other rows in that worker are not read again. Any
    other exception is raised. A worker closes a slide when it moves on to a later one (its
    chunks come in order).
    """

    def __init__(self, slides: list[PatchDataset], *, catch: bool = True) -> None:
        self.slides = list(slides)
        self.offsets = np.cumsum([0] + [len(s) for s in self.slides]).astype(np.int64)
        self.catch = catch
        self._failed: dict[int, str] = {}
        self._current = -1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slide_of(self, g: int) -> int:
        """Index of the slide row ``g`` belongs to."""
        return int(np.searchsorted(self.offsets, g, side="right") - 1)

    def __getitem__(self, g: int) -> tuple[int, torch.Tensor, str]:
        k = self.slide_of(g)
        if k != self._current:
            if 0 <= self._current < k:
                self.slides[self._current].close()
            self._current = k
        ds = self.slides[k]
        error = self._failed.get(k)
        if error is None:
            try:
                return g, torch.from_numpy(np.array(ds.encoder_input(g - int(self.offsets[k])))), ""
            except Exception as exc:
                if not (self.catch and slide_failure(exc)):
                    raise
                error = self._failed[k] = failure_message(ds.slide_id, exc)
                ds.close()
        return g, torch.zeros((ds.input_px, ds.input_px, 3), dtype=torch.uint8), error

    def chunks(self, rows: int = WORKER_ROWS) -> list[list[int]]:
        """Indices of each worker task: whole bags of one slide (:meth:`PatchDataset.chunks`)."""
        return [list(range(o + a, o + b)) for ds, o in zip(self.slides, self.offsets.tolist())
                for a, b in ds.chunks(rows)]

    def close(self) -> None:
        for ds in self.slides:
            ds.close()
        self._current = -1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_failed"], state["_current"] = {}, -1
        return state


def slide_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised while reading a slide's patches, means the slide cannot be used.

    Such a slide is recorded as failed and skipped. An error that says the machine or file
    system is in trouble is not (an OSError with an errno in ``TRANSIENT_ERRNOS``, or an
    OpenSlide/OpenCV message with those words): the job fails and is retried.
    """
    if machine_trouble(exc):  # OpenSlide and OpenCV carry no errno, only the system's words for it
        return False
    return isinstance(exc, (SlideError, openslide.OpenSlideError, OSError, cv2.error))


def failure_message(slide_id: str, exc: BaseException) -> str:
    """One line naming the slide and the error."""
    text = str(exc).strip() or type(exc).__name__
    return text if slide_id in text else f"slide {slide_id!r}: {type(exc).__name__}: {text}"


def _collate(items: list[tuple[int, torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return (torch.tensor([i for i, _, _ in items], dtype=torch.int64), torch.stack([x for _, x, _ in items]),
            [e for _, _, e in items])


def _worker_init(_: int) -> None:
    """One torch thread per worker: parallelism comes from the worker count.

    OpenCV's thread count is deliberately left alone: ``cv2.setNumThreads`` in a forked
    child whose parent had used OpenCV's pool waits forever on the parent's threads.
    """
    torch.set_num_threads(1)


def patch_loader(dataset: ShardPatches, *, num_workers: int, pin_memory: bool, rows: int = WORKER_ROWS) -> DataLoader:
    """In-order chunks ``(indices, uint8 (B, H, W, 3), errors)`` of whole bags (about ``rows``
    rows each; the encoder loop regroups them into model batches); 4 chunks prefetched per worker."""
    return DataLoader(
        dataset,
        batch_sampler=dataset.chunks(rows),
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
