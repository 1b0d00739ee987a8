"""Slide-level evaluation of a trained model: zero-shot slide classification, a linear probe on
slide embeddings and caption <-> slide retrieval, over the pipeline's own slides.

Models (the ``--model`` of ``mrplip evaluate-slides``):

* a PathFLIP run (``pathflip-{run}``, ``results/pathflip/{run}``): a slide's embedding is its
  slide embedding over all its patch features; zero-shot compares it with each class's prompt
  ensemble; retrieval compares it with the captions' embeddings.
* an MR-PLIP run (``{run}``, ``results/pretrain/{run}``), the baseline: every patch at
  ``evaluation.slides.magnification`` is embedded; zero-shot scores a class by the mean of its
  ``topk`` most similar patches (MI-Zero's top-k pooling of patch-to-prompt similarity); the
  probe and retrieval use the mean patch embedding.

Labels: each column named in ``evaluation.slides.labels`` of the slide table, with a prompt file
(the tile prompt format, :mod:`mrplip_core.evaluation.prompts`) or, when null, the label values
themselves in the templates ``{name}.`` and ``an H&E slide of {name}.``. A task whose number
cannot be computed is ``n/a`` with the reason (one class, too few slides, no captions).
Metrics: weighted F1, balanced accuracy, accuracy and macro AUC (one-vs-rest over the class
scores), each with its protocol.

Retrieval uses the slides the PathFLIP run held out (its ``slides.parquet`` split ``val``) when
there are at least two; otherwise every slide with a caption, and the protocol says the model
trained on them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from mrplip_core.io.errors import machine_trouble
from mrplip_core.evaluation.plan import PATHFLIP_PREFIX, SLIDES
from mrplip_core.evaluation.metrics import classification_metrics, recall_at_k
from mrplip_core.evaluation.probe import linear_probe
from mrplip_core.evaluation.prompts import PromptSet
from mrplip_core.evaluation.settings import EvaluationSettings, SlideEvalSettings
from mrplip_core.evaluation.zeroshot import l2_normalize
from mrplip_core.layout import Layout

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("{name}.", "an H&E slide of {name}.")


def group_name(magnification: float) -> str:
    return f"{magnification:g}x"


def slide_patches(results: str | Path, encoder: str, slide: str, magnifications: Sequence[float],
                  boxes: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All patch features of a slide at ``magnifications``: (N, D) float32 and (N,) magnification
    (x); with ``boxes`` (a list), their level-0 px boxes (x, y, size) are appended to it."""
    path = Layout(results).image_features(encoder, slide)
    feats, mags = [], []
    with h5py.File(path, "r") as f:
        if str(f.attrs.get("status", "ok")) != "ok":
            raise ValueError(f"slide {slide}: its features failed ({path})")
        for m in magnifications:
            if group_name(m) in f:
                g = f[group_name(m)]
                x = g["features"][()].astype(np.float32)
                feats.append(x)
                mags.append(np.full(len(x), float(m)))
                if boxes is not None:
                    xy = g["coords"][()].astype(np.int64).reshape(-1, 2)
                    boxes.append(np.column_stack([xy, np.full(len(xy), int(g.attrs["size"]))]))
    if not feats or not sum(len(x) for x in feats):
        raise ValueError(f"slide {slide}: no patch at {[group_name(m) for m in magnifications]} in {path}")
    return np.concatenate(feats), np.concatenate(mags)


class SlideModel:
    """What slide-level evaluation needs of a model: slide embeddings, class scores, texts."""

    def __init__(self, model: str, results: str | Path, settings: SlideEvalSettings) -> None:
        self.name = model
        self.results = Path(results)
        self.settings = settings
        layout = Layout(results)
        if model.startswith(PATHFLIP_PREFIX):
            from mrplip_core.pathflip_model import load_pathflip

            self.family = "pathflip"
            self.model = load_pathflip(layout.pathflip_dir(model[len(PATHFLIP_PREFIX):]))
            self.encoder = str(self.model.meta["image_encoder"])
            self.magnifications = self.model.magnifications
        else:
            from mrplip_core.model import load

            self.family = "mrplip"
            self.model = load(layout.run_dir(model))
            from mrplip_core.train.summary import read_run_config

            self.encoder = str(read_run_config(layout.run_dir(model))["data"]["image_encoder"])
            self.magnifications = (float(settings.magnification),)
        self._patch_cache: dict[str, np.ndarray] = {}

    def _patch_embeddings(self, slide: str) -> np.ndarray:
        if slide not in self._patch_cache:
            feats, mags = slide_patches(self.results, self.encoder, slide, self.magnifications)
            self._patch_cache[slide] = l2_normalize(self.model.encode_image(feats, mags).numpy())
        return self._patch_cache[slide]

    def slide_embedding(self, slide: str) -> np.ndarray:
        if self.family == "pathflip":
            feats, mags = slide_patches(self.results, self.encoder, slide, self.magnifications)
            return self.model.encode_slide(feats, mags).numpy()
        return l2_normalize(self._patch_embeddings(slide).mean(0))

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return l2_normalize(self.model.encode_text(list(texts)).numpy())

    def heatmaps(self, slide: str, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, P), boxes (P, 3))``: each text's score of every patch (PathFLIP: its
        pooling heatmap; MR-PLIP: patch-text cosine) and the patches' level-0 x, y, size."""
        boxes: list = []
        feats, mags = slide_patches(self.results, self.encoder, slide, self.magnifications, boxes)
        if self.family == "pathflip":
            scores = self.model.localize(feats, mags, list(texts)).numpy()
        else:
            scores = self.texts(texts) @ self._patch_embeddings(slide).T
        return scores, np.concatenate(boxes)

    def class_scores(self, slide: str, class_vectors: np.ndarray) -> np.ndarray:
        """(C,) score of each class for one slide (PathFLIP: cosine; MR-PLIP: top-k patch mean)."""
        if self.family == "pathflip":
            return l2_normalize(self.slide_embedding(slide)) @ class_vectors.T
        sims = self._patch_embeddings(slide) @ class_vectors.T  # (P, C)
        k = min(self.settings.topk, len(sims))
        return np.sort(sims, axis=0)[-k:].mean(0)

    @property
    def protocol(self) -> str:
        if self.family == "pathflip":
            return "PathFLIP slide embedding vs the class's prompt ensemble (cosine)"
        return (f"MI-Zero top-{self.settings.topk} pooling: a class's score is the mean of the {self.settings.topk} "
                f"highest patch-to-prompt cosines over the slide's {self.settings.magnification:g}x patches")


def prompt_set(column: str, values: Sequence[str], prompt_file: str | None) -> PromptSet:
    if prompt_file:
        return PromptSet.read(prompt_file)
    return PromptSet(DEFAULT_TEMPLATES, {v: (v,) for v in values}, source=f"the values of column {column}")


def macro_auc(y: np.ndarray, scores: np.ndarray) -> float | None:
    """One-vs-rest macro AUC over the classes present (None with fewer than two)."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return None
    aucs = [roc_auc_score(y == c, scores[:, c]) for c in present]
    return float(np.mean(aucs))


def _classify(model: SlideModel, table: pd.DataFrame, column: str, prompt_file: str | None,
              settings: EvaluationSettings) -> dict[str, Any]:
    labels = table[column].astype("string")
    usable = labels.notna() & (labels.str.strip() != "")
    slides = list(table.index[usable])
    values = labels[usable].astype(str)
    classes = sorted(set(values))
    out: dict[str, Any] = {"column": column, "n_slides": len(slides), "classes": classes}
    if len(classes) < 2:
        reason = f"column {column} has {len(classes)} class(es) over {len(slides)} slide(s): nothing to classify"
        return out | {"zero_shot": {"status": "n/a", "reason": reason}, "linear_probe": {"status": "n/a", "reason": reason}}
    y = np.array([classes.index(v) for v in values])
    try:
        prompts = prompt_set(column, classes, prompt_file)
        missing = [c for c in classes if c not in prompts.classes]
        if missing:
            raise ValueError(f"prompts for column {column} lack the label(s) {missing} ({prompts.source})")
        vectors = []
        for c in classes:
            emb = model.texts(prompts.prompts(c))
            vectors.append(l2_normalize(emb.mean(0)))
        class_vectors = np.stack(vectors)
        scores = np.stack([model.class_scores(s, class_vectors) for s in slides])
        zero = classification_metrics(y, scores.argmax(1), classes)
        zero.update(status="ok", protocol="zero-shot", protocol_note=model.protocol, macro_auc=macro_auc(y, scores))
    except ValueError as exc:  # a prompt problem never costs the probe
        zero = {"status": "error", "reason": str(exc)}
    x = np.stack([model.slide_embedding(s) for s in slides])
    probe = linear_probe(x, y, classes, None, settings.linear_probe)
    out.update(zero_shot=zero, linear_probe=probe)
    return out


def _retrieval(model: SlideModel, results: Path, settings: SlideEvalSettings, held_out: Sequence[str]) -> dict[str, Any]:
    captions = pd.read_parquet(Layout(results).slide_captions)
    captions = captions[captions["status"] == "ok"].set_index("slide_id")
    if len([s for s in held_out if s in captions.index]) >= 2:
        slides = [s for s in held_out if s in captions.index]
        split, note = "held-out", f"the {len(slides)} slides the PathFLIP run held out from training"
    else:
        slides = list(captions.index)
        split, note = "all", f"every slide with a caption ({len(slides)}); the models trained on them (no held-out slides)"
    usable = []
    for s in slides:
        try:
            usable.append((s, model.slide_embedding(s)))
        except (ValueError, OSError) as exc:
            if machine_trouble(exc):  # a full disk or an I/O error fails the job
                raise
            log.warning("retrieval: %s", exc)
    if len(usable) < 2:
        return {"status": "n/a", "reason": f"{len(usable)} slide(s) with a caption and features: retrieval needs 2"}
    names = [s for s, _ in usable]
    slide_emb = l2_normalize(np.stack([e for _, e in usable]))
    text_emb = model.texts([str(captions.loc[s, "caption"]) for s in names])
    sim = slide_emb @ text_emb.T
    ks = [k for k in settings.ks]
    chance = {f"R@{k}": min(1.0, k / len(names)) for k in ks}
    return {"status": "ok", "n_slides": len(names), "split": split, "split_note": note, "chance": chance,
            "slide_to_caption": recall_at_k(sim, ks), "caption_to_slide": recall_at_k(sim.T, ks)}


def _localisation(model: SlideModel, table: pd.DataFrame, settings: SlideEvalSettings,
                  slide_table: str | Path) -> dict[str, Any]:
    """Each annotated region kind's heatmap against the patches mostly inside its regions
    (:func:`mrplip_core.wsi.regions.patch_truth`), over every slide whose ``settings.regions``
    column names a region GeoJSON (relative paths: to the slide table's folder). A kind's
    heatmap: the model's scores for the kind's name, or the mean over its prompts when
    ``settings.region_prompts`` names a prompt file. A slide whose file cannot be read is
    recorded with the reason and left out."""
    from mrplip_core.evaluation.metrics import localization_metrics
    from mrplip_core.evaluation.plan import region_path
    from mrplip_core.wsi.regions import patch_truth, read_regions, region_kinds

    column = settings.regions
    assert column is not None
    if column not in table.columns:
        return {"status": "n/a", "reason": f"the slide table has no column {column!r} (evaluation.slides.regions)"}
    try:
        prompts = PromptSet.read(settings.region_prompts) if settings.region_prompts else None
    except ValueError as exc:
        return {"status": "error", "reason": str(exc)}
    queries: list[tuple[np.ndarray, np.ndarray]] = []
    slides, failed = 0, {}
    for slide, value in table[column].items():
        if not isinstance(value, str) or not value.strip():
            continue
        path = region_path(value, slide_table)
        try:
            regions = read_regions(path)
            kinds = region_kinds(regions)
            if not kinds:
                raise ValueError(f"{path}: no region")
            texts = [prompts.prompts(k) if prompts and k in prompts.classes else [k] for k in kinds]
            flat = [t for ts in texts for t in ts]
            scores, boxes = model.heatmaps(str(slide), flat)
        except (ValueError, OSError) as exc:
            failed[str(slide)] = str(exc)
            log.warning("localisation: slide %s left out: %s", slide, exc)
            continue
        truth = patch_truth(boxes, regions)["kind"].to_numpy()
        start = 0
        for kind, ts in zip(kinds, texts):
            queries.append((scores[start:start + len(ts)].mean(0), truth == kind))
            start += len(ts)
        slides += 1
    if not queries:
        reason = f"no slide with features names a readable region file in column {column!r}"
        return {"status": "n/a", "reason": reason, "failed": failed}
    source = f"its prompts in {settings.region_prompts} (mean heatmap)" if prompts else "its name"
    protocol = (f"each annotated kind's {source} as the text query; AUROC of the patch scores against the patches "
                f"mostly inside that kind's regions, pointing = the top patch inside; mean over (slide, kind)")
    return {"status": "ok", "n_slides": slides, "failed": failed, "protocol_note": protocol,
            **localization_metrics(queries)}


def evaluate_slides(model_name: str, results: str | Path, slide_table: str | Path, settings: EvaluationSettings,
                    held_out: Sequence[str] = ()) -> dict[str, Any]:
    """Slide-level metrics of one model (see the module docstring); JSON-ready."""
    from mrplip_core.wsi.table import read_slide_table

    s = settings.slides
    results = Path(results)
    model = SlideModel(model_name, results, s)
    table = read_slide_table(slide_table)
    usable = []
    for slide in table.index:
        try:
            slide_patches(results, model.encoder, slide, model.magnifications)
            usable.append(slide)
        except (ValueError, OSError, FileNotFoundError) as exc:
            if machine_trouble(exc):  # a full disk or an I/O error fails the job
                raise
            log.warning("left out of slide-level evaluation: %s", exc)
    table = table.loc[usable]
    tasks = {}
    for column, prompt_file in s.labels.items():
        if column not in table.columns:
            reason = f"the slide table has no column {column!r} (evaluation.slides.labels)"
            tasks[column] = {"column": column, "zero_shot": {"status": "n/a", "reason": reason},
                             "linear_probe": {"status": "n/a", "reason": reason}}
            continue
        tasks[column] = _classify(model, table, column, prompt_file, settings)
    localisation = _localisation(model, table, s, slide_table) if s.regions else None
    return {"model": model_name, "dataset": SLIDES, "status": "ok", "family": model.family, "encoder": model.encoder,
            "n_slides": len(usable), "labels": tasks, "retrieval": _retrieval(model, results, s, held_out),
            "localisation": localisation}


def slide_summary_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of ``eval/summary.csv`` for one slide-level metrics.json."""
    base = {"model": metrics.get("model"), "dataset": SLIDES}
    if metrics.get("status") != "ok":
        return [{**base, "task": "slides", "status": metrics.get("status"), "note": metrics.get("reason", "")}]
    rows = []
    for column, task in metrics["labels"].items():
        for kind in ("zero_shot", "linear_probe"):
            r = task[kind]
            row = {**base, "task": f"slide {kind} {column}", "status": r.get("status"),
                   "note": r.get("protocol_note", r.get("reason", ""))}
            if r.get("status") == "ok":
                row.update(weighted_f1=r["weighted_f1"], balanced_accuracy=r["balanced_accuracy"], accuracy=r["accuracy"],
                           n_test=r["n"], protocol=r.get("protocol", ""), macro_auc=r.get("macro_auc"))
            rows.append(row)
    loc = metrics.get("localisation")
    if loc is not None:
        note = loc.get("protocol_note", loc.get("reason", ""))
        if loc.get("failed"):
            note += f"; left out: {'; '.join(f'{s}: {r}' for s, r in loc['failed'].items())}"
        row = {**base, "task": "slide localisation", "status": loc["status"], "note": note}
        if loc["status"] == "ok":
            row.update(auroc=loc["auroc"], pointing=loc["pointing"], n_test=loc["n"],
                       protocol=f"chance: AUROC 0.5, pointing {loc['pointing_chance']:.2f}")
        rows.append(row)
    r = metrics["retrieval"]
    if r.get("status") != "ok":
        rows.append({**base, "task": "slide retrieval", "status": r.get("status"), "note": r.get("reason", "")})
    else:
        for direction in ("caption_to_slide", "slide_to_caption"):
            for k, v in r[direction].items():
                rows.append({**base, "task": f"slide retrieval {direction} {k}", "status": "ok", "recall": v,
                             "n_test": r["n_slides"], "protocol": r["split"],
                             "note": f"{r['split_note']}; chance {r['chance'][k]:.2f}"})
    return rows
