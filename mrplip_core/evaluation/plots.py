"""PNG figures of the evaluation and the report: confusion matrices and loss curves (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mrplip_core.io.atomic import atomic_path

#: Loss columns of ``results/pretrain/{run}/metrics.csv`` in the order they are drawn.
LOSS_COLUMNS: tuple[str, ...] = ("loss", "loss_bl", "itc", "itm", "mlm", "plm", "cvta", "mrtva")
#: Confusion matrices are saved at this dpi; shown at half their pixel width (crisp on HiDPI screens).
CONFUSION_DPI = 200

LOSS_TITLES = {
    "loss": "total L", "loss_bl": "L_bl = ITC+ITM+MLM+PLM", "itc": "ITC (contrastive)", "itm": "ITM (matching)",
    "mlm": "MLM (masked LM)", "plm": "PLM (prefix LM)", "cvta": "CVTA", "mrtva": "MRTVA",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], out: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix (colour) with the counts written in each cell."""
    plt = _pyplot()
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
    return _save(fig, out)


def loss_curves_png(metrics: pd.DataFrame, out: str | Path, title: str, val: pd.DataFrame | None = None) -> Path | None:
    """One panel per loss term present in ``metrics`` (train; validation dashed), MRTVA per
    magnification pair, and the learning rate. None when there is nothing to draw."""
    plt = _pyplot()
    if "step" not in metrics.columns or metrics.empty:
        return None
    panels: list[tuple[str, list[str]]] = [(c, [c]) for c in LOSS_COLUMNS if c in metrics.columns and metrics[c].notna().any()]
    pairs = [c for c in metrics.columns if c.startswith("mrtva/") and metrics[c].notna().any()]
    if pairs:
        panels.append(("MRTVA by magnification pair", pairs))
    if "lr" in metrics.columns:
        panels.append(("learning rate", ["lr"]))
    if not panels:
        return None
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows), dpi=100, squeeze=False)
    for ax, (name, cols) in zip(axes.flat, panels):
        for c in cols:
            ax.plot(metrics["step"], metrics[c], lw=1.3, label=c.split("/", 1)[-1] if len(cols) > 1 else "train")
            if val is not None and c in val.columns and val[c].notna().any():
                ax.plot(val["step"], val[c], "--", lw=1.3, label="validation")
        ax.set_title(LOSS_TITLES.get(name, name), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(cols) > 1 or (val is not None and cols[0] in val.columns):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    plt = _pyplot()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out)
