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


# -- localisation of a text query over a slide's patches (the planted cohort, PathFLIP) --------


def _weights_and_labels(weights: Sequence[float], inside: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    w, m = np.asarray(weights, dtype=np.float64).ravel(), np.asarray(inside, dtype=bool).ravel()
    if w.shape != m.shape:
        raise ValueError(f"weights ({w.shape}) and inside ({m.shape}) must have one value per patch")
    return w, m


def localization_auroc(weights: Sequence[float], inside: Sequence[bool]) -> float:
    """AUROC of a query's per-patch weights against the patches inside its region.

    1.0: every patch inside outweighs every patch outside; 0.5: chance (and tied weights);
    0.0: the reverse. Ties count a half (Mann-Whitney). NaN when every patch, or none, is
    inside (the ranking is then undefined).
    """
    w, m = _weights_and_labels(weights, inside)
    n_in, n_out = int(m.sum()), int((~m).sum())
    if n_in == 0 or n_out == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(w)  # average ranks: a tie counts a half
    return float((ranks[m].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def pointing_hit(weights: Sequence[float], inside: Sequence[bool]) -> bool:
    """Whether the query's top-weighted patch is inside its region. Ties are broken against
    the query (every patch tied at the top must be inside), so constant weights hit only when
    every patch is inside."""
    w, m = _weights_and_labels(weights, inside)
    if not len(w):
        raise ValueError("pointing needs at least one patch")
    return bool(m[w == w.max()].all())


def localization_metrics(queries: Sequence[tuple[Sequence[float], Sequence[bool]]]) -> dict[str, Any]:
    """Localisation over many text queries, each ``(weights, inside)`` over one slide's patches.

    Returns ``auroc`` (mean over the queries whose AUROC is defined, ``n_auroc`` of them;
    chance ``auroc_chance`` = 0.5), ``pointing`` (share of queries whose top patch is inside)
    and ``pointing_chance`` (the expected pointing of uniformly random weights: the mean share
    of each query's patches inside its region), with ``n`` queries.
    """
    aurocs = [localization_auroc(w, m) for w, m in queries]
    defined = [a for a in aurocs if a == a]
    hits = [pointing_hit(w, m) for w, m in queries]
    shares = [float(np.mean(np.asarray(m, dtype=bool))) for _, m in queries]
    nan = float("nan")
    return {
        "n": len(queries),
        "auroc": float(np.mean(defined)) if defined else nan,
        "n_auroc": len(defined),
        "auroc_chance": 0.5,
        "pointing": float(np.mean(hits)) if hits else nan,
        "pointing_chance": float(np.mean(shares)) if shares else nan,
    }


def retrieval_chance(correct: np.ndarray, k: int) -> float:
    """Expected Recall@``k`` of a random ranking: the mean over queries (rows of the boolean
    (Q, G) ``correct`` mask) of the probability that one of the ``c`` correct items of ``G``
    lands in the top ``k``: ``1 - C(G - c, k) / C(G, k)``."""
    from math import comb

    mask = np.asarray(correct, dtype=bool)
    g = mask.shape[1]
    kk = min(k, g)
    return float(np.mean([1.0 - comb(g - int(c), kk) / comb(g, kk) for c in mask.sum(axis=1)]))


def caption_slide_retrieval(similarity: np.ndarray, ks: Sequence[int] = (1, 5),
                            correct: np.ndarray | None = None) -> dict[str, float]:
    """Caption-to-slide retrieval: ``similarity`` is (captions, slides), caption ``i`` belongs to
    slide ``i`` unless the boolean ``correct`` mask says otherwise. ``R@k`` (:func:`recall_at_k`,
    ties against the query) and ``R@k_chance`` (:func:`retrieval_chance`) for each k, with ``n``
    captions and ``gallery`` slides."""
    sim = np.asarray(similarity, dtype=np.float64)
    mask = np.eye(*sim.shape, dtype=bool) if correct is None else np.asarray(correct, dtype=bool)
    out: dict[str, float] = {"n": int(sim.shape[0]), "gallery": int(sim.shape[1])}
    out.update(recall_at_k(sim, ks, mask))
    out.update({f"R@{k}_chance": retrieval_chance(mask, k) for k in ks})
    return out
