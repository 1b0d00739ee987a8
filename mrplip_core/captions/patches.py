"""Patches to caption: tasks from the tile manifest, reading them, encoding them for a request."""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mrplip_core.captions.settings import CaptionSettings, ImageParams
from mrplip_core.wsi.slide import Slide, resize_level_pixels


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
    # Level-0 box (x, y, w, h) read once and shared by the level-0 patches of this patch's
    # bag (see SlideReader); None: the patch is read on its own.
    shared_box: tuple[int, int, int, int] | None = None

#: Largest shared box, in level-0 px (a 40x bag of 512 px patches at 0.25 um/px: 4096 x 4096).
MAX_SHARED_PX = 4096 * 4096


def tasks_from_manifest(manifest: pd.DataFrame, settings: CaptionSettings, skip: set[str] | frozenset[str] = frozenset()) -> list[PatchTask]:
    """Tasks for the manifest's patches, in manifest order, leaving out ``skip`` patch ids."""
    rows = [row for row in manifest.itertuples(index=False) if row.patch_id not in skip]
    boxes = _shared_boxes(rows)
    return [
        PatchTask(
            slide_id=str(row.slide_id), patch_id=str(row.patch_id), magnification=float(row.magnification),
            mpp=float(row.mpp), x=int(row.x), y=int(row.y), size=int(row.size), patch_px=int(row.patch_px),
            read_level=int(row.read_level), prompt=settings.prompt_for(float(row.magnification)),
            shared_box=boxes.get(row.bag_id) if int(row.read_level) == 0 else None,
        )
        for row in rows
    ]


def _shared_boxes(rows: list) -> dict[str, tuple[int, int, int, int]]:
    """Per bag, the level-0 box around its level-0 patches, where reading it once is worth it.

    A bag's patches cover the same tissue at several magnifications (a quad-tree), so the
    patches read from level 0 overlap: a 20x patch is a quarter of a 10x one. Reading their
    bounding box once and cropping reads each level-0 pixel once instead of once per
    magnification. Kept only when the box has no more pixels than the patches together and
    at most MAX_SHARED_PX.
    """
    ext: dict[str, list[int]] = {}
    for row in rows:
        if int(row.read_level) != 0:
            continue
        x, y, s = int(row.x), int(row.y), int(row.size)
        e = ext.get(row.bag_id)
        if e is None:
            ext[row.bag_id] = [x, y, x + s, y + s, s * s, 1]
        else:
            e[0], e[1], e[2], e[3] = min(e[0], x), min(e[1], y), max(e[2], x + s), max(e[3], y + s)
            e[4] += s * s
            e[5] += 1
    out = {}
    for bag, (x0, y0, x1, y1, area, n) in ext.items():
        box = (x1 - x0) * (y1 - y0)
        if n > 1 and box <= area and box <= MAX_SHARED_PX:
            out[bag] = (x0, y0, x1 - x0, y1 - y0)
    return out


class SlideReader:
    """Reads patches of several slides from many threads (one OpenSlide handle per slide).

    OpenSlide handles are safe to share between threads. ``slides`` maps slide id to
    ``(path, mpp)``, normally from the tiles stage's record ``results/slides/{slide}.json``.

    A task with a ``shared_box`` is cropped from one read of that box (level 0), shared by
    the threads reading the bag's other patches: the pixels are those of reading the patch
    alone (level 0 is not resampled), then resized as :meth:`Slide.read_region` does. The
    last ``keep_boxes`` boxes are kept (tasks come in manifest order, bag by bag).
    """

    def __init__(self, slides: dict[str, tuple[str, float]], keep_boxes: int = 4) -> None:
        self._where = dict(slides)
        self._open: dict[str, Slide] = {}
        self._lock = threading.Lock()
        self._boxes: OrderedDict[tuple, Future] = OrderedDict()
        self.keep_boxes = keep_boxes

    def read(self, task: PatchTask) -> np.ndarray:
        """The patch as RGB uint8 ``(patch_px, patch_px, 3)``, exactly as the manifest defines it."""
        slide = self._slide(task.slide_id)
        if task.shared_box is None or task.read_level != 0 or self.keep_boxes < 1:
            return slide.read_region(task.x, task.y, task.size, task.patch_px, level=task.read_level)
        bx, by, _, _ = task.shared_box
        box = self._box(slide, task.slide_id, task.shared_box)
        crop = box[task.y - by : task.y - by + task.size, task.x - bx : task.x - bx + task.size]
        if task.size == task.patch_px:
            return crop.copy()
        return resize_level_pixels(crop, task.patch_px, task.patch_px)  # as Slide.read_rect resizes

    def _box(self, slide: Slide, slide_id: str, box: tuple[int, int, int, int]) -> np.ndarray:
        """The level-0 RGB pixels of ``box``: read by the first thread that needs them."""
        key = (slide_id, box)
        with self._lock:
            fut = self._boxes.get(key)
            owner = fut is None
            if owner:
                fut = self._boxes[key] = Future()
                while len(self._boxes) > self.keep_boxes:
                    self._boxes.popitem(last=False)
        if owner:
            try:
                x, y, w, h = box
                fut.set_result(slide.read_rect(x, y, w, h, w, h, level=0))
            except BaseException as exc:
                with self._lock:
                    self._boxes.pop(key, None)
                fut.set_exception(exc)
        return fut.result()

    def _slide(self, slide_id: str) -> Slide:
        with self._lock:
            slide = self._open.get(slide_id)
            if slide is None:
                path, mpp = self._where[slide_id]
                slide = self._open[slide_id] = Slide(path, slide_id, mpp=mpp)
            return slide

    def close(self, slide_id: str | None = None) -> None:
        """Close one slide's handle, or all of them (and forget their shared boxes)."""
        with self._lock:
            ids = [slide_id] if slide_id is not None else list(self._open)
            for key in [k for k in self._boxes if slide_id is None or k[0] == slide_id]:
                del self._boxes[key]
            for sid in ids:
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
    cols = ["slide_id", "patch_id", "bag_id", "magnification", "x", "y", "size", "patch_px", "mpp", "read_level"]
    return pd.read_parquet(path, columns=cols)


def iter_chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
