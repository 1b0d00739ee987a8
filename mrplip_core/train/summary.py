"""What a pretraining run folder says about itself, read back for the evaluation and the report.

``results/pretrain/{run}/`` as :mod:`mrplip_core.train.trainer` writes it:

* ``config.yaml``: the resolved ``pretrain`` section (written before the first step);
* ``metrics.csv``: one row per ``log_every`` steps: ``step``, ``lr``, the total ``loss``,
  ``loss_bl``, one column per active term (:data:`LOSS_COLUMNS`) and diagnostics such as
  ``mrtva/10x-20x``; ``val_metrics.csv``: the same per validation;
* ``model.json`` and ``model.safetensors``: the export (:mod:`mrplip_core.model.export`).

Reading these imports neither torch nor the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mrplip_core.layout import TEMPLATES
from mrplip_core.model.terms import TERMS

#: The run folder's resolved config and its training metrics (names from the layout's templates).
RUN_CONFIG_FILE = Path(TEMPLATES["run_config"]).name  # config.yaml
RUN_METRICS_FILE = Path(TEMPLATES["run_metrics"]).name  # metrics.csv

#: Loss columns of ``metrics.csv`` in the order the report shows them.
LOSS_COLUMNS: tuple[str, ...] = ("loss", "loss_bl", *TERMS)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved ``pretrain`` section a run wrote (``results/pretrain/{run}/config.yaml``)."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a finished pretrain run folder")
    loaded = yaml.safe_load(path.read_text()) or {}
    return dict(loaded.get("pretrain", loaded))


def run_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The ablation-relevant facts of a run config: magnifications, active loss terms, steps."""
    data = config.get("data", {}) or {}
    weights = ((config.get("loss") or {}).get("weights") or {})
    terms = [t for t in TERMS if float(weights.get(t, 1.0)) > 0]
    mags = [float(m) for m in data.get("magnifications", [])]
    return {
        "magnifications": mags,
        "multi_resolution": len(mags) > 1,
        "terms": terms,
        "cvta": "cvta" in terms,
        "mrtva": "mrtva" in terms,
        "steps": (config.get("train") or {}).get("steps"),
        "text_encoder": (config.get("model") or {}).get("text_encoder"),
        "seed": config.get("seed"),
    }


def read_metrics(run_dir: str | Path, *, validation: bool = False) -> pd.DataFrame | None:
    """The run's ``metrics.csv`` (``val_metrics.csv`` with ``validation``); None while it does
    not exist or is still empty."""
    path = Path(run_dir) / ("val_metrics.csv" if validation else RUN_METRICS_FILE)
    if not path.exists() or not path.stat().st_size:
        return None
    return pd.read_csv(path)
