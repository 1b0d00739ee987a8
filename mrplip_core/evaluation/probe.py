"""Linear probing and k-shot probing on frozen embeddings (scikit-learn logistic regression).

The regularisation C is chosen by stratified cross-validation on the training tiles only
(never on the test tiles); every split is seeded. Which protocol ran, and why, is part of
the result (``protocol_note``), because on the tiny sample sets the honest protocol is
pooled k-fold cross-validation, not a held-out test set.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from mrplip_core.evaluation.metrics import classification_metrics, mean_std
from mrplip_core.evaluation.settings import FewShotSettings, LinearProbeSettings

#: Below this many test tiles the result carries a small-sample warning.
SMALL_TEST = 100


@dataclass
class ProbeFit:
    """A fitted probe and how its C was chosen."""

    model: Pipeline
    c: float
    cv_folds: int  # 0: C was not cross-validated (default_c)
    converged: bool

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)


def _pipeline(settings: LinearProbeSettings, c: float, seed: int) -> Pipeline:
    steps: list[tuple[str, Any]] = [("scale", StandardScaler())] if settings.standardize else []
    steps.append(("lr", LogisticRegression(C=c, max_iter=settings.max_iter, random_state=seed)))
    return Pipeline(steps)


def fit_probe(x: np.ndarray, y: np.ndarray, settings: LinearProbeSettings, seed: int = 0) -> ProbeFit:
    """Fit a logistic regression on ``(x, y)``; C by stratified CV within ``(x, y)`` when possible.

    The CV has ``min(inner_folds, smallest class size)`` folds and runs on a stratified
    subsample of at most ``cv_max_samples`` tiles; the final fit uses every tile. With a
    class of one tile no CV is possible and C is ``default_c``.
    """
    xs, ys = x, y
    if len(y) > settings.cv_max_samples:
        keep, _ = train_test_split(np.arange(len(y)), train_size=settings.cv_max_samples, stratify=y, random_state=seed)
        xs, ys = x[keep], y[keep]
    counts = np.bincount(ys)
    folds = int(min(settings.inner_folds, counts[counts > 0].min()))
    c = float(settings.default_c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if folds >= 2 and len(settings.c_grid) > 1:
            search = GridSearchCV(
                _pipeline(settings, c, seed),
                {"lr__C": list(settings.c_grid)},
                cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                scoring=settings.scoring,
                refit=False,
            )
            search.fit(xs, ys)
            c = float(search.best_params_["lr__C"])
        else:
            folds = 0
        model = _pipeline(settings, c, seed).fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return ProbeFit(model, c, folds, converged)


def choose_protocol(y: np.ndarray, split: Sequence[str] | None, settings: LinearProbeSettings) -> tuple[str, int, str]:
    """``(protocol, outer folds, reason)``; protocol "n/a" when the data cannot support any."""
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    wanted = settings.protocol
    if wanted == "given" and split is None:
        raise ValueError("evaluation.linear_probe.protocol is 'given' but the dataset has no split column")
    if wanted == "given" or (wanted == "auto" and split is not None):
        return "given", 0, "the dataset's own train/test split"
    if wanted == "holdout" or (wanted == "auto" and smallest >= settings.min_holdout_per_class):
        if smallest < 2:
            return "n/a", 0, f"a class has {smallest} tile: a held-out split needs 2 per class"
        n, k = len(y), int((counts > 0).sum())
        n_test = math.ceil(settings.test_fraction * n)
        if n_test < k or n - n_test < k:
            return "n/a", 0, (f"a stratified hold-out of {settings.test_fraction:.0%} of {n} tiles leaves {n_test} "
                              f"test and {n - n_test} training tiles for {k} classes (each needs one of each); "
                              "use protocol kfold or auto")
        return "holdout", 0, f"stratified hold-out of {settings.test_fraction:.0%} of each class"
    if smallest < 2:
        return "n/a", 0, (f"a class has {smallest} tile, so no split can both train and test every class "
                          "(a linear probe needs at least 2 tiles per class)")
    folds = min(settings.folds, smallest)
    why = f" ({folds} folds because the smallest class has {smallest} tiles)" if folds < settings.folds else ""
    return "kfold", folds, f"stratified {folds}-fold cross-validation over all tiles, out-of-fold predictions pooled{why}"


def linear_probe(x: np.ndarray, y: np.ndarray, classes: Sequence[str], split: Sequence[str] | None,
                 settings: LinearProbeSettings) -> dict[str, Any]:
    """Linear probe under the protocol :func:`choose_protocol` picks.

    Returns the metrics of :func:`classification_metrics` on the test tiles plus
    ``protocol``, ``protocol_note``, ``n_train``, ``n_test``, the C of every fit, and
    ``predictions`` (one per tile; -1 for tiles never tested).
    """
    protocol, folds, reason = choose_protocol(y, split, settings)
    if protocol == "n/a":
        return {"status": "n/a", "reason": reason}
    seed = settings.seed
    predictions = np.full(len(y), -1, dtype=np.int64)
    fits: list[ProbeFit] = []
    if protocol == "kfold":
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
    elif protocol == "holdout":
        train, test = train_test_split(np.arange(len(y)), test_size=settings.test_fraction, stratify=y, random_state=seed)
        splits = [(np.sort(train), np.sort(test))]
    else:
        s = np.asarray(split)
        splits = [(np.flatnonzero(s == "train"), np.flatnonzero(s == "test"))]
        if not len(splits[0][0]) or not len(splits[0][1]):
            return {"status": "n/a", "reason": "the given split has no train or no test tiles"}
    for train, test in splits:
        fit = fit_probe(x[train], y[train], settings, seed)
        predictions[test] = fit.predict(x[test])
        fits.append(fit)
    tested = predictions >= 0
    result = classification_metrics(y[tested], predictions[tested], classes)
    n_train = int(np.mean([len(tr) for tr, _ in splits]))
    cv = sorted({f.cv_folds for f in fits})
    c_note = ("C fixed to default_c (a training class has a single tile, so no CV)" if cv == [0]
              else f"C chosen by {'/'.join(map(str, cv))}-fold stratified CV on the training tiles only ({settings.scoring})")
    note = f"{reason}; {c_note}."
    if result["n"] < SMALL_TEST:
        note += (f" Only {result['n']} test predictions: one tile moves accuracy by {100 / result['n']:.1f} points, "
                 "so this is a smoke test of the pipeline, not a benchmark.")
    return {
        "status": "ok",
        "protocol": protocol,
        "folds": folds,
        "protocol_note": note,
        "n_train": n_train,
        "n_test": int(tested.sum()),
        "c": [f.c for f in fits],
        "converged": all(f.converged for f in fits),
        **result,
        "predictions": predictions.tolist(),
    }


def few_shot(x: np.ndarray, y: np.ndarray, classes: Sequence[str], split: Sequence[str] | None,
             settings: FewShotSettings, probe: LinearProbeSettings) -> dict[str, Any]:
    """k-shot probes: for each k and seed, k training tiles per class, metrics on the test tiles.

    Training tiles are drawn from the train split (all tiles when there is none); the test
    tiles are the given test split, else every tile not drawn. A k is skipped (with the
    reason) when a class has too few tiles to draw k and still test it.
    """
    s = np.asarray(split) if split is not None else None
    pool = np.flatnonzero(s == "train") if s is not None else np.arange(len(y))
    fixed_test = np.flatnonzero(s == "test") if s is not None else None
    if fixed_test is not None and not len(fixed_test):
        return {"status": "n/a", "reason": "the given split has no test tiles", "skipped": {}}
    per_class = [pool[y[pool] == c] for c in range(len(classes))]
    smallest = min(len(p) for p in per_class)
    need_spare = fixed_test is None  # without a test split, each class must keep a tile to test
    shots: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for k in settings.shots:
        if smallest < k + (1 if need_spare else 0):
            skipped[str(k)] = (f"the smallest class has {smallest} tile(s): {k}-shot needs {k}"
                               + (" plus one to test" if need_spare else ""))
            continue
        runs = []
        for seed in settings.seeds:
            rng = np.random.default_rng([int(seed), int(k)])
            train = np.sort(np.concatenate([rng.choice(p, size=k, replace=False) for p in per_class]))
            test = fixed_test if fixed_test is not None else np.setdiff1d(np.arange(len(y)), train)
            fit = fit_probe(x[train], y[train], probe, int(seed))
            m = classification_metrics(y[test], fit.predict(x[test]), classes)
            runs.append({"seed": int(seed), "c": fit.c, "n_test": m["n"], "weighted_f1": m["weighted_f1"],
                         "balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"]})
        shots[str(k)] = {
            "n_seeds": len(runs),
            "n_test": int(np.mean([r["n_test"] for r in runs])),
            **{key: mean_std([r[key] for r in runs]) for key in ("weighted_f1", "balanced_accuracy", "accuracy")},
            "runs": runs,
        }
    if not shots:
        return {"status": "n/a", "reason": "; ".join(f"{k}-shot: {v}" for k, v in skipped.items()), "skipped": skipped}
    note = ("training tiles drawn from the train split, tested on the test split" if fixed_test is not None
            else "k training tiles per class drawn per seed, tested on every other tile")
    return {"status": "ok", "protocol_note": note + "; C by CV on the k-shot tiles when k >= 2, else default_c.",
            "shots": shots, "skipped": skipped}
