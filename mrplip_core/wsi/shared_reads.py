"""Reading a slide's patches so that each pixel of a visual bag is decoded once.

A bag's patches cover the same tissue at several magnifications (a quad-tree), so a child
patch read from the same pyramid level as one of its ancestors lies inside the ancestor's
read: a 40x patch inside its 20x parent, both from level 0; on a one-level slide every
patch of a bag inside the bag's root. Decoding the slide is most of the cost of reading,
so :class:`SharedReader` reads the ancestor once at level resolution and crops the child
from it instead of decoding the same tiles again.

Only where the crop is the same pixels as a read of the child: the level's downsample is
a whole number, both boxes start on its grid, and the format's levels are plain grids of
whole-pixel tiles (then OpenSlide copies pixels, no resampling; ``SHARED_READ_VENDORS``).
The crop then goes through the same resize as :meth:`Slide.read_rect`, so every patch is
bit-identical to ``Slide.read_region(x, y, size, patch_px, level=read_level)``.

Used by the feature loader (one reader per DataLoader worker) and the captions client
(one reader per slide, shared by its request threads).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future

import numpy as np
import pandas as pd

from mrplip_core.wsi.slide import Slide, resize_level_pixels

#: Manifest columns that define a patch read (level-0 px x, y, size; output px; pyramid level).
GEOMETRY = ("x", "y", "size", "patch_px", "read_level")

#: Level pixels a reader keeps. A region is dropped once the last patch cropped from it is
#: read; a bag of 512 px patches down to 40x holds at most its 16 20x parents (3 MiB each).
REGION_CACHE_BYTES = 128 * 2**20

#: OpenSlide vendors whose levels are plain grids of whole-pixel tiles, so a read is a copy of
#: level pixels (checked by tests/test_shared_reads.py on an SVS and a generic pyramidal TIFF).
#: Other formats (some have overlapping or sub-pixel tile positions: MIRAX, Hamamatsu VMS,
#: Ventana, Zeiss) have their patches read alone until checked the same way.
SHARED_READ_VENDORS = frozenset({"aperio", "generic-tiff"})


def manifest_geometry(manifest: pd.DataFrame) -> np.ndarray:
    """``(N, 5)`` int64: x, y, size (level-0 px), patch_px, read_level of each manifest row."""
    return manifest.loc[:, list(GEOMETRY)].to_numpy(np.int64)


def parent_rows(manifest: pd.DataFrame) -> np.ndarray:
    """Row of each row's parent patch (-1: a bag root, or no patch_id/parent_id columns)."""
    n = len(manifest)
    if not {"patch_id", "parent_id"} <= set(manifest.columns):
        return np.full(n, -1, dtype=np.int64)
    row_of = {pid: i for i, pid in enumerate(manifest["patch_id"].tolist())}
    return np.array([row_of.get(p, -1) if isinstance(p, str) else -1 for p in manifest["parent_id"].tolist()],
                    dtype=np.int64)


def shared_sources(geometry: np.ndarray, parents: np.ndarray, downsamples: tuple[float, ...],
                   max_bytes: int | None = None) -> np.ndarray:
    """Per row, its farthest ancestor whose level read holds the row's exact pixels (itself if none).

    A read of box ``(x, y, size)`` at a level with downsample ``d`` covers level pixels
    ``x / d ..`` (``ceil(size / d)`` of them); a child's read is a crop of an ancestor's when
    both are at the same level, ``d`` is a whole number, both boxes start on multiples of
    ``d``, and the child's pixels lie inside the ancestor's. With ``max_bytes`` an ancestor
    whose read (RGB) is larger is not used (a bag's root on a one-level slide can be huge).
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
        if max_bytes is not None and 3 * wa * wa > max_bytes:
            return False
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


class SharedReader:
    """Patches of one slide by manifest row, children cropped from an ancestor's read when exact.

    Thread-safe: the first thread that needs a region reads it, the others wait for it.

    Parameters
    ----------
    slide: the open slide (the caller owns and closes it).
    geometry: :func:`manifest_geometry` of the slide's tile manifest.
    parents: :func:`parent_rows` of the same manifest.
    cache_bytes: level pixels kept at most (least recently used dropped first); an ancestor
        whose read alone is larger is not shared; 0 reads every patch alone.
    wanted: the rows that will be read (default: all). A region is read only when its
        wanted rows together have at least its pixels, and only while two or more of
        them are still to come; it is dropped after the last.
    """

    def __init__(
        self,
        slide: Slide,
        geometry: np.ndarray,
        parents: np.ndarray,
        *,
        cache_bytes: int = REGION_CACHE_BYTES,
        wanted: Iterable[int] | None = None,
    ) -> None:
        self.slide = slide
        self.geometry = np.asarray(geometry, dtype=np.int64)
        n = len(self.geometry)
        self.cache_bytes = int(cache_bytes)
        if self.cache_bytes > 0 and slide.info.vendor in SHARED_READ_VENDORS:
            self.sources = shared_sources(self.geometry, parents, slide.info.level_downsamples, self.cache_bytes)
        else:
            self.sources = np.arange(n, dtype=np.int64)
        rows = np.arange(n) if wanted is None else np.fromiter(wanted, dtype=np.int64)
        # a region is read only where that decodes fewer pixels than reading its rows alone
        # (a resumed job may want only a few children of a bag)
        downsamples = np.asarray(slide.info.level_downsamples, dtype=np.float64)
        #: per row, the side of its read at level resolution (level px)
        self._level_px = np.maximum(1, np.ceil(self.geometry[:, 2] / downsamples[self.geometry[:, 4]])).astype(np.int64)
        area = self._level_px.astype(np.float64) ** 2
        served = np.bincount(self.sources[rows], weights=area[rows], minlength=n)
        alone = served[self.sources] < area[self.sources]
        self.sources[alone] = np.flatnonzero(alone)
        #: per source row, the wanted rows not yet read that its region would serve (itself included)
        self._uses = np.bincount(self.sources[rows], minlength=n).astype(np.int64)
        self._regions: OrderedDict[int, Future] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def read(self, i: int) -> np.ndarray:
        """Patch of manifest row ``i``: RGB uint8 ``(patch_px, patch_px, 3)``, as ``Slide.read_region``.

        May be a read-only view into a kept region (no copy): copy it before writing to it.
        """
        x, y, size, patch_px, level = (int(v) for v in self.geometry[i])
        src = int(self.sources[i])
        with self._lock:
            self._uses[src] -= 1
            left = int(self._uses[src])  # other rows still to come that this region serves
            fut = self._regions.get(src)
            owner = fut is None and left > 0  # read the region only if it serves another row too
            if owner:
                fut = self._regions[src] = Future()
                self._bytes += self._region_bytes(src)
                self._evict(keep=src)
            elif fut is not None:
                self._regions.move_to_end(src)
            if fut is not None and left <= 0:  # the last row it serves: forget it
                del self._regions[src]
                self._bytes -= self._region_bytes(src)
        if fut is None:
            return self.slide.read_region(x, y, size, patch_px, level=level)
        if owner:
            self._fill(src, fut)
            region = fut.result()
        else:
            try:
                region = fut.result()
            except Exception:  # the owner's read failed (and raised there): this patch on its own
                return self.slide.read_region(x, y, size, patch_px, level=level)
        d = int(self.slide.info.level_downsamples[level])  # a whole number wherever regions are shared
        sx, sy = (int(v) for v in self.geometry[src, :2])
        lw = int(self._level_px[i])
        ox, oy = (x - sx) // d, (y - sy) // d
        return resize_level_pixels(region[oy : oy + lw, ox : ox + lw], patch_px, patch_px)

    def _fill(self, src: int, fut: Future) -> None:
        x, y, size, _, level = (int(v) for v in self.geometry[src])
        lw = int(self._level_px[src])
        try:
            pixels = self.slide.read_rect(x, y, size, size, lw, lw, level=level)  # level resolution
        except BaseException as exc:
            with self._lock:
                if self._regions.get(src) is fut:
                    del self._regions[src]
                    self._bytes -= self._region_bytes(src)
            fut.set_exception(exc)
            raise
        pixels.setflags(write=False)
        fut.set_result(pixels)

    def _region_bytes(self, row: int) -> int:
        return 3 * int(self._level_px[row]) ** 2

    def _evict(self, keep: int) -> None:
        """Drop least recently used regions until within ``cache_bytes`` (never ``keep``)."""
        for row in list(self._regions):
            if self._bytes <= self.cache_bytes:
                break
            if row != keep:
                del self._regions[row]
                self._bytes -= self._region_bytes(row)

    @property
    def kept_bytes(self) -> int:
        """Level pixels currently kept (bytes)."""
        return self._bytes
