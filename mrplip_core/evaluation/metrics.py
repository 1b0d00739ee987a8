"""Classification and retrieval metrics, as plain JSON-ready dicts.

Classification follows the MR-PLIP paper: weighted F1 (F1 per class weighted by the class's
support) is the headline number, with balanced accuracy (mean per-class recall) and
accuracy beside it. Computed with scikit-learn so they equal what anyone else computes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """Weighted F1, balanced accuracy, accuracy, a per-class table and the confusion matrix.

    ``y_true`` / ``y_pred`` are indices into ``classes``; every class is a row of the
    per-class table and of the confusion matrix (rows: true, columns: predicted), also
    those absent from ``y_true``.
    """
    yt, yp = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    labels = list(range(len(classes)))
    prec, rec, f1, support = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    with warnings.catch_warnings():  # a prediction of a class absent from y_true is a normal error here
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(yt, yp))
    return {
        "n": int(len(yt)),
        "weighted_f1": float(f1_score(yt, yp, labels=labels, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(yt, yp, labels=labels, average="macro", zero_division=0)),
        "balanced_accuracy": balanced,
        "accuracy": float(accuracy_score(yt, yp)),
        "chance_accuracy": float(np.max(np.bincount(yt, minlength=len(classes))) / max(1, len(yt))),
        "per_class": [
            {"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, prec, rec, f1, support)
        ],
        "confusion": confusion_matrix(yt, yp, labels=labels).astype(int).tolist(),
    }


def recall_at_k(similarity: np.ndarray, ks: Sequence[int], correct: np.ndarray | None = None) -> dict[str, float]:
    """Recall@K of queries (rows) against a gallery (columns).

    ``similarity`` is (Q, G). Query ``i``'s correct items are ``correct[i]`` (a boolean
    (Q, G) mask); by default the diagonal (pair ``i`` is query ``i`` and item ``i``). A
    query counts as found at K when any correct item ranks within the top K. Ties are
    broken against the query (a correct item tied with a wrong one ranks after it), so a
    degenerate embedding (constant similarity) scores 0, never a lucky 1.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    q, g = sim.shape
    mask = np.eye(q, g, dtype=bool) if correct is None else np.asarray(correct, dtype=bool)
    if mask.shape != sim.shape or not mask.any(axis=1).all():
        raise ValueError("every query needs at least one correct gallery item")
    best_correct = np.where(mask, sim, -np.inf).max(axis=1)
    # rank of the best correct item: wrong items scoring >= it come first
    rank = (np.where(~mask, sim, -np.inf) >= best_correct[:, None]).sum(axis=1)
    return {f"R@{k}": float(np.mean(rank < k)) for k in ks}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "min", "max", "n"}`` (std over seeds with ddof=1; 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}
