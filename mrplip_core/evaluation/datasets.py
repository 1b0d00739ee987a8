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
        """Tile ``i`` as RGB uint8 (H, W, 3)."""
        try:
            with Image.open(self.paths[i]) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"dataset {self.name!r}: cannot read {self.paths[i]}: {exc}") from None

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
