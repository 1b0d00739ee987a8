"""PNG figures of the report that no stage draws: the loss curves of a pretraining run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mrplip_core.io.figures import pyplot, save_png
from mrplip_core.train.summary import LOSS_COLUMNS

LOSS_TITLES = {
    "loss": "total L", "loss_bl": "L_bl = ITC+ITM+MLM+PLM", "itc": "ITC (contrastive)", "itm": "ITM (matching)",
    "mlm": "MLM (masked LM)", "plm": "PLM (prefix LM)", "cvta": "CVTA", "mrtva": "MRTVA",
}


def loss_curves_png(metrics: pd.DataFrame, out: str | Path, title: str, val: pd.DataFrame | None = None) -> Path | None:
    """One panel per loss term present in ``metrics`` (train; validation dashed), MRTVA per
    magnification pair, and the learning rate. None when there is nothing to draw."""
    plt = pyplot()
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
    return save_png(fig, out)
