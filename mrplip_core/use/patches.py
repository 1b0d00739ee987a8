"""A slide's patch features, read for a model: features, magnification and level-0 px boxes.

From ``results/features/{encoder}/{slide}.h5`` (:mod:`mrplip_core.features.h5`): every patch
of the groups (``"20x"``, ...) at the magnifications the model was trained on, in file order.
A patch's box is its level-0 top-left ``coords`` and, as its side, the group's ``size``
attribute (level-0 px). Needs h5py and numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from mrplip_core.layout import RESULTS, Layout


class SlideInputError(ValueError):
    """A slide that cannot be used: unknown, without features, or without patches at the
    model's magnifications (the message names the slide and the file)."""


@dataclass(frozen=True)
class SlidePatches:
    """The patches of one slide at the model's magnifications."""

    slide_id: str
    features: np.ndarray  # (P, D) float32, the frozen encoder's features
    magnification: np.ndarray  # (P,) float64, x
    x: np.ndarray  # (P,) int64, level-0 px, top-left
    y: np.ndarray  # (P,) int64, level-0 px, top-left
    size: np.ndarray  # (P,) int64, side of the square patch in level-0 px
    patch_ids: np.ndarray  # (P,) str
    source: Path  # the features file

    def __len__(self) -> int:
        return len(self.patch_ids)

    @property
    def extent(self) -> tuple[int, int]:
        """(width, height) in level-0 px of the box holding every patch (from the origin)."""
        return int((self.x + self.size).max()), int((self.y + self.size).max())

    def table(self) -> pd.DataFrame:
        """patch_id, x, y, w, h (level-0 px) and magnification of every patch."""
        return pd.DataFrame({"patch_id": self.patch_ids.astype(str), "x": self.x, "y": self.y, "w": self.size,
                             "h": self.size, "magnification": self.magnification})


def group_name(magnification: float) -> str:
    """The features file's group of a magnification (x): ``20.0`` -> ``"20x"``."""
    return f"{float(magnification):g}x"


def known_slides(results: str | Path) -> list[str] | None:
    """The slide ids of ``results/slides.parquet``, or None when the results have no slide table."""
    table = Layout(results).slides_table
    if not table.exists():
        return None
    return [str(s) for s in pd.read_parquet(table, columns=["slide_id"])["slide_id"]]


def read_slide_patches(results: str | Path, encoder: str, slide: str,
                       magnifications: Sequence[float]) -> SlidePatches:
    """Every patch of ``slide`` at ``magnifications`` (x) from its ``encoder`` features file.

    Raises :class:`SlideInputError` naming the slide when it is not in the slide table (and has
    no features file), when its features file is missing, or when the file holds no patch at
    those magnifications (a slide whose features stage found no tissue or failed).
    """
    layout = Layout(results if results is not None else RESULTS)
    path = layout.image_features(encoder, slide)
    if not path.exists():
        known = known_slides(layout.root)
        if known is not None and slide not in known:
            shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
            raise SlideInputError(f"slide {slide!r}: unknown slide id (not in {layout.slides_table}; known: {shown})")
        raise SlideInputError(f"slide {slide!r}: no features: {path} not found (the features stage has not run "
                              f"for encoder {encoder!r} on this slide)")
    wanted = [group_name(m) for m in magnifications]
    feats, mags, xs, ys, sizes, ids = [], [], [], [], [], []
    with h5py.File(path, "r") as f:
        status = str(f.attrs.get("status", "ok"))
        for name in wanted:
            if name not in f or not f[name]["features"].shape[0]:
                continue
            g = f[name]
            n = g["features"].shape[0]
            coords = g["coords"][()].astype(np.int64)
            side = g.attrs.get("size")
            if side is None:
                raise SlideInputError(f"slide {slide!r}: {path} group {name!r} has no 'size' attribute (level-0 px)")
            feats.append(g["features"][()].astype(np.float32))
            mags.append(np.full(n, float(g.attrs.get("magnification", float(name[:-1])))))
            xs.append(coords[:, 0])
            ys.append(coords[:, 1])
            sizes.append(np.full(n, int(side), dtype=np.int64))
            ids.append(np.asarray(g["patch_ids"].asstr()[()], dtype=object))
        groups = sorted(k for k in f if isinstance(f[k], h5py.Group))
        reason = str(f.attrs.get("reason", "") or f.attrs.get("error", ""))
    if not feats:
        why = f" (status {status!r}: {reason})" if status != "ok" or reason else ""
        raise SlideInputError(f"slide {slide!r}: no patch features at {wanted} in {path}{why}; groups: {groups}")
    return SlidePatches(slide, np.concatenate(feats), np.concatenate(mags), np.concatenate(xs), np.concatenate(ys),
                        np.concatenate(sizes), np.concatenate(ids), path)
