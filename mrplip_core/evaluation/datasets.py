"""Labelled tile sets for evaluation: a CSV of ``path,label`` or a folder of class subfolders.

Tiles are read as RGB uint8 at their own size; the embedder resizes them to its encoder's
input exactly as the pipeline resizes its patches (``encoders.image.resize_patch``). Their
resolution (um/px) comes from the config, since tile files rarely carry a trustworthy one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mrplip_core.evaluation.settings import DatasetSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "test")
#: Smallest tile side (px) evaluated; smaller images (a 1x1 placeholder) are an error.
MIN_TILE_PX = 16


class DatasetError(ValueError):
    """A tile set that cannot be read (the message names the file or row)."""


@dataclass(frozen=True)
class TileDataset:
    """Tiles, their labels and resolution.

    ``classes`` is the sorted list of distinct labels; ``y`` the index of each tile's label
    in it. ``split`` is None, or "train"/"test" per tile when the CSV gives a split column.
    """

    name: str
    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    mpp: float  # um/px of the tiles
    magnification: float  # x presented to the model (10 / mpp unless configured)
    split: tuple[str, ...] | None = None
    source: str = ""  # the CSV or folder it was read from

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise DatasetError(f"dataset {self.name!r}: {len(self.paths)} paths but {len(self.labels)} labels")
        if self.split is not None and len(self.split) != len(self.paths):
            raise DatasetError(f"dataset {self.name!r}: split column has the wrong length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.asarray([index[label] for label in self.labels], dtype=np.int64)

    def class_counts(self) -> dict[str, int]:
        return {c: int(n) for c, n in zip(*np.unique(np.asarray(self.labels), return_counts=True))}

    def read(self, i: int) -> np.ndarray:
        """Tile ``i`` as RGB uint8 (H, W, 3), whatever the file's mode.

        Grayscale, palette and CMYK tiles are converted to RGB; 16-bit tiles are scaled to
        8 bits (the top byte, as PIL reduces 16-bit RGB); a transparent tile is composited
        onto white, as slide regions are (:mod:`mrplip_core.wsi.slide`). Raises
        :class:`DatasetError` naming the file when it cannot be decoded or is smaller than
        ``MIN_TILE_PX`` on a side.
        """
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                rgb = _to_rgb(im)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"dataset {self.name!r}: cannot read {path}: {exc}") from None
        h, w = rgb.shape[:2]
        if min(h, w) < MIN_TILE_PX:
            raise DatasetError(f"dataset {self.name!r}: tile {path} is {w}x{h} px, smaller than "
                               f"{MIN_TILE_PX} px on a side: not a tile to evaluate on")
        return rgb

    def batches(self, batch_size: int, indices: Sequence[int] | None = None, threads: int = 1) -> Iterator[list[np.ndarray]]:
        """Tiles in order, ``batch_size`` at a time (only ``indices`` when given), decoded by
        ``threads`` threads (the next batch is read while the caller works on this one)."""
        idx = list(range(len(self)) if indices is None else indices)
        chunks = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
        if threads <= 1:
            for chunk in chunks:
                yield [self.read(i) for i in chunk]
            return
        with ThreadPoolExecutor(threads) as pool:
            pending = [pool.map(self.read, chunk) for chunk in chunks[:2]]
            for k in range(len(chunks)):
                batch = list(pending[k])
                if k + 2 < len(chunks):
                    pending.append(pool.map(self.read, chunks[k + 2]))
                yield batch

    def relative_paths(self) -> list[str]:
        """Paths relative to the source folder (for tables people read)."""
        root = Path(self.source)
        root = root.parent if root.suffix.lower() == ".csv" else root
        out = []
        for p in self.paths:
            try:
                out.append(str(p.relative_to(root)))
            except ValueError:
                out.append(str(p))
        return out

    @classmethod
    def load(cls, spec: DatasetSpec, base: str | Path | None = None) -> TileDataset:
        """Read the tile list of ``spec``; relative ``spec.path`` resolves against ``base``."""
        path = Path(spec.path).expanduser()
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        if not path.exists():
            raise DatasetError(f"dataset {spec.name!r}: {path} does not exist")
        if path.is_dir():
            paths, labels, split = _from_folder(path, spec.name)
        else:
            paths, labels, split = _from_csv(path, spec.name)
        if len(set(labels)) < 2:
            raise DatasetError(f"dataset {spec.name!r}: needs at least 2 classes, found {sorted(set(labels))}")
        return cls(spec.name, tuple(paths), tuple(labels), float(spec.mpp), spec.model_magnification,
                   tuple(split) if split is not None else None, str(path))


def _from_folder(root: Path, name: str) -> tuple[list[Path], list[str], None]:
    paths, labels = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(sub.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f.resolve())
                labels.append(sub.name)
    if not paths:
        raise DatasetError(f"dataset {name!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders of {root}")
    return paths, labels, None


def _from_csv(csv: Path, name: str) -> tuple[list[Path], list[str], list[str] | None]:
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise DatasetError(f"dataset {name!r}: {csv} lacks column(s) {sorted(missing)} (has {list(df.columns)})")
    if df.empty:
        raise DatasetError(f"dataset {name!r}: {csv} has no rows")
    paths, labels = [], []
    for row, (p, label) in enumerate(zip(df["path"], df["label"]), start=2):
        if not p or not label:
            raise DatasetError(f"dataset {name!r}: {csv} line {row}: empty path or label")
        full = Path(p).expanduser()
        full = full if full.is_absolute() else csv.parent / full
        if not full.is_file():
            raise DatasetError(f"dataset {name!r}: {csv} line {row}: no file {full}")
        paths.append(full.resolve())
        labels.append(label)
    split = None
    if "split" in df.columns:
        split = [s.strip().lower() for s in df["split"]]
        bad = sorted(set(split) - set(SPLITS))
        if bad:
            raise DatasetError(f"dataset {name!r}: {csv} split values must be {SPLITS}, found {bad}")
    return paths, labels, split


def _to_rgb(im: Image.Image) -> np.ndarray:
    """A decoded PIL image as RGB uint8: 16-bit to 8-bit by its top byte, alpha onto white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit (or 32-bit int) grayscale
        values = np.asarray(im, dtype=np.int64)
        shift = 8 if im.mode.startswith("I;16") or values.max(initial=0) <= 0xFFFF else 24
        gray = (np.clip(values, 0, None) >> shift).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        a = rgba[..., 3:4]
        return ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return np.asarray(im.convert("RGB"))
