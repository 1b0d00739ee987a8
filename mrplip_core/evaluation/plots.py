"""PNG figures of the evaluation: confusion matrices (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mrplip_core.io.figures import pyplot, save_png

#: Confusion matrices are saved at this dpi; shown at half their pixel width (crisp on HiDPI screens).
CONFUSION_DPI = 200


def confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], out: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix (colour) with the counts written in each cell."""
    plt = pyplot()
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(classes)
    side = min(6.0, max(2.6, 0.32 * n + 1.2))  # inches: about 0.3 in per class, drawn 1:1 in the report
    fig, ax = plt.subplots(figsize=(side + 1.3, side + 0.5), dpi=CONFUSION_DPI)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    ax.set_title(title, fontsize=8)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.6 else "black")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    return save_png(fig, out)
