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

import copy
from collections.abc import Mapping
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
    return upgrade_saved_config(loaded.get("pretrain", loaded))


def upgrade_saved_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """A saved pretrain section (a run folder's config.yaml, a checkpoint's state) with the
    keys of older versions renamed; the input is not modified.

    Before the paper's objective became the default, CVTA's denominator was the boolean
    ``loss.cvta.other_positives_in_denominator`` and the MRTVA pairs the boolean
    ``train.mrtva_all_ancestors``; they read as ``loss.cvta.denominator`` (true:
    all_keywords, false: negatives_only) and ``loss.mrtva.pairs`` (true: lineage, false:
    adjacent). So resuming such a run reports which setting changed instead of failing on
    an unknown key, and the report describes it.
    """
    out = copy.deepcopy(dict(values))
    cvta = (out.get("loss") or {}).get("cvta") or {}
    train = out.get("train") or {}
    if "other_positives_in_denominator" in cvta:
        everything = cvta.pop("other_positives_in_denominator")
        cvta["denominator"] = "all_keywords" if everything else "negatives_only"
    if "mrtva_all_ancestors" in train:
        lineage = train.pop("mrtva_all_ancestors")
        out["loss"] = loss = out.get("loss") or {}
        loss["mrtva"] = {**(loss.get("mrtva") or {}), "pairs": "lineage" if lineage else "adjacent"}
    return out


def run_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The ablation-relevant facts of a run config: magnifications, active loss terms, the
    form of CVTA and MRTVA (None when the term is off), steps."""
    data = config.get("data", {}) or {}
    loss = config.get("loss") or {}
    weights = loss.get("weights") or {}
    terms = [t for t in TERMS if float(weights.get(t, 1.0)) > 0]
    mags = [float(m) for m in data.get("magnifications", [])]
    return {
        "magnifications": mags,
        "multi_resolution": len(mags) > 1,
        "terms": terms,
        "cvta": "cvta" in terms,
        "mrtva": "mrtva" in terms,
        "cvta_denominator": (loss.get("cvta") or {}).get("denominator") if "cvta" in terms else None,
        "mrtva_pairs": (loss.get("mrtva") or {}).get("pairs") if "mrtva" in terms else None,
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
