"""Patches to caption: tasks from the tile manifest, reading them, encoding them for a request."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mrplip_core.captions.settings import CaptionSettings, ImageParams
from mrplip_core.wsi.shared_reads import REGION_CACHE_BYTES, SharedReader, manifest_geometry, parent_rows
from mrplip_core.wsi.slide import Slide


@dataclass(frozen=True)
class PatchTask:
    """One patch to caption, with what is needed to read it (units as in the tile manifest)."""

    slide_id: str
    patch_id: str
    magnification: float  # x
    mpp: float  # effective um per output px
    x: int  # level-0 px
    y: int  # level-0 px
    size: int  # level-0 px
    patch_px: int  # output px
    read_level: int
    prompt: str
    row: int = -1  # row in the slide's tile manifest (-1: unknown, the patch is read on its own)


def tasks_from_manifest(manifest: pd.DataFrame, settings: CaptionSettings, skip: set[str] | frozenset[str] = frozenset()) -> list[PatchTask]:
    """Tasks for the manifest's patches, in manifest order, leaving out ``skip`` patch ids."""
    return [
        PatchTask(
            slide_id=str(row.slide_id), patch_id=str(row.patch_id), magnification=float(row.magnification),
            mpp=float(row.mpp), x=int(row.x), y=int(row.y), size=int(row.size), patch_px=int(row.patch_px),
            read_level=int(row.read_level), prompt=settings.prompt_for(float(row.magnification)), row=i,
        )
        for i, row in enumerate(manifest.itertuples(index=False))
        if row.patch_id not in skip
    ]


class SlideReader:
    """Reads patches of several slides from many threads (one OpenSlide handle per slide).

    OpenSlide handles are safe to share between threads. ``slides`` maps slide id to
    ``(path, mpp)``, normally from the tiles stage's record ``results/slides/{slide}.json``.

    After :meth:`share_reads` a slide's patches are read through a
    :class:`~mrplip_core.wsi.shared_reads.SharedReader`: a child is cropped from its
    ancestor's read wherever that gives the same pixels, read once by the first thread
    that needs it (at most ``cache_bytes`` of level pixels per slide kept). Otherwise, and
    always with ``cache_bytes=0``, each patch is read on its own.
    """

    def __init__(self, slides: dict[str, tuple[str, float]], cache_bytes: int = REGION_CACHE_BYTES) -> None:
        self._where = dict(slides)
        self._open: dict[str, Slide] = {}
        self._shared: dict[str, SharedReader] = {}
        self._plans: dict[str, tuple[np.ndarray, np.ndarray, list[int]]] = {}  # slide: not opened yet
        self._lock = threading.Lock()
        self.cache_bytes = cache_bytes

    def share_reads(self, slide_id: str, manifest: pd.DataFrame, tasks: list[PatchTask]) -> None:
        """Read ``tasks`` of ``slide_id`` (rows of its tile ``manifest``) with shared reads.

        Nothing is opened here: the slide opens on its first read, so a slide that cannot be
        opened fails its own patches (recorded per patch), not the job.
        """
        if self.cache_bytes > 0:
            with self._lock:
                self._plans[slide_id] = (manifest_geometry(manifest), parent_rows(manifest), [t.row for t in tasks])

    def read(self, task: PatchTask) -> np.ndarray:
        """The patch as RGB uint8 ``(patch_px, patch_px, 3)``, exactly as the manifest defines it.

        May be a read-only view into a shared region: copy it before writing to it.
        """
        slide = self._slide(task.slide_id)
        shared = self._shared.get(task.slide_id)
        if shared is not None and task.row >= 0:
            return shared.read(task.row)
        return slide.read_region(task.x, task.y, task.size, task.patch_px, level=task.read_level)

    def _slide(self, slide_id: str) -> Slide:
        """The open slide (opened on first use, with its shared reader if planned)."""
        with self._lock:
            slide = self._open.get(slide_id)
            if slide is None:
                path, mpp = self._where[slide_id]
                slide = self._open[slide_id] = Slide(path, slide_id, mpp=mpp)
                plan = self._plans.pop(slide_id, None)
                if plan is not None:
                    geometry, parents, rows = plan
                    self._shared[slide_id] = SharedReader(slide, geometry, parents, cache_bytes=self.cache_bytes,
                                                          wanted=rows)
            return slide

    def close(self, slide_id: str | None = None) -> None:
        """Close one slide's handle, or all of them (and forget their shared regions)."""
        with self._lock:
            ids = [slide_id] if slide_id is not None else list(self._open)
            if slide_id is None:
                self._plans.clear()
            for sid in ids:
                self._shared.pop(sid, None)
                self._plans.pop(sid, None)
                slide = self._open.pop(sid, None)
                if slide is not None:
                    slide.close()


def resize_for_model(rgb: np.ndarray, params: ImageParams) -> np.ndarray:
    """Downscale to ``params.max_px`` on the longer side (area interpolation); else unchanged."""
    h, w = rgb.shape[:2]
    if params.max_px is None or max(h, w) <= params.max_px:
        return rgb
    scale = params.max_px / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def encode_image(rgb: np.ndarray, params: ImageParams) -> tuple[bytes, str]:
    """Encode RGB uint8 as PNG (lossless, fast compression) or JPEG; returns ``(bytes, mime)``."""
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    if params.format == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        mime = "image/png"
    elif params.format == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(params.jpeg_quality)])
        mime = "image/jpeg"
    else:
        raise ValueError(f"captions.image.format must be png or jpeg, got {params.format!r}")
    if not ok:
        raise RuntimeError("image encoding failed")
    return buf.tobytes(), mime


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG bytes to RGB uint8 (what a server sees)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def data_url(data: bytes, mime: str) -> str:
    """``data:`` URL of an encoded image, as chat-completions ``image_url`` accepts."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def load_manifest(path: str | Path) -> pd.DataFrame:
    """A tile manifest (``results/tiles/{slide}.parquet``) with the columns captioning needs."""
    cols = ["slide_id", "patch_id", "parent_id", "bag_id", "magnification", "x", "y", "size", "patch_px", "mpp", "read_level"]
    return pd.read_parquet(path, columns=cols)


def iter_chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
