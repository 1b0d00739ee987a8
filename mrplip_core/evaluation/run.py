"""Evaluate one model on one tile set (zero-shot, linear probe, k-shot), or on retrieval, to files.

``results/eval/{model}/{dataset}/``:

* ``metrics.json``: everything below, plus what the model and the data were;
* ``per_class.csv``: precision, recall, F1 and support per class, per task;
* ``predictions.csv``: each tile's label and prediction per task;
* ``confusion_zero_shot.png``, ``confusion_linear_probe.png``.

``results/eval/{model}/retrieval/metrics.json``: recall@K both ways.
``results/eval/summary.csv``: one row per (model, dataset, task), the report's tables.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import mrplip_core
from mrplip_core.evaluation.datasets import TileDataset
from mrplip_core.evaluation.embedders import FeatureEmbedder, ImageTextEmbedder
from mrplip_core.evaluation.metrics import classification_metrics
from mrplip_core.evaluation.plots import confusion_png
from mrplip_core.evaluation.probe import few_shot, linear_probe
from mrplip_core.evaluation.prompts import PromptError, PromptSet
from mrplip_core.evaluation.retrieval import evaluate_retrieval
from mrplip_core.evaluation.settings import DatasetSpec, EvaluationSettings
from mrplip_core.evaluation.tile_features import read_tile_features, tile_features_encoder
from mrplip_core.evaluation.zeroshot import class_embeddings, zero_shot_predict
from mrplip_core.io.atomic import write_text
from mrplip_core.evaluation.slides import SLIDES, slide_summary_rows
from mrplip_core.layout import TEMPLATES

log = logging.getLogger(__name__)

#: The metrics file of one result folder (``eval/{model}/{dataset}/``), from the layout.
METRICS_JSON = Path(TEMPLATES["eval_metrics"]).name
#: Every result's metrics file below the eval folder (``*/*/metrics.json``), from the layout.
METRICS_GLOB = Path(TEMPLATES["eval_metrics"]).relative_to(TEMPLATES["eval_dir"]).as_posix().format(model="*", dataset="*")

TASKS = ("zero_shot", "linear_probe", "few_shot")


def embed_dataset(embedder: ImageTextEmbedder, dataset: TileDataset, *, batch_size: int = 128,
                  tile_features: str | Path | None = None, read_threads: int = 1) -> tuple[np.ndarray, str]:
    """Image embeddings of every tile, and where they came from.

    From the cached frozen features when ``tile_features`` exists and the embedder starts
    from that encoder; else from the pixels. Tiles are presented at ``10 / magnification``
    um/px (the dataset's mpp unless its magnification is overridden).
    """
    mpp = 10.0 / dataset.magnification
    if tile_features is not None and Path(tile_features).exists() and isinstance(embedder, FeatureEmbedder):
        cached = tile_features_encoder(tile_features)
        if cached == embedder.image_encoder:
            return embedder.embed_features(read_tile_features(tile_features, dataset), mpp), f"cached features {tile_features}"
        log.warning("%s holds %s features but %s starts from %s: embedding the tiles from their pixels",
                    tile_features, cached, embedder.name, embedder.image_encoder)
    parts = [embedder.embed_images(batch, mpp) for batch in dataset.batches(batch_size, threads=read_threads)]
    return np.concatenate(parts).astype(np.float32), "tile pixels"


def evaluate_dataset(embedder: ImageTextEmbedder, dataset: TileDataset, settings: EvaluationSettings,
                     out_dir: str | Path, *, prompts: PromptSet | None = None,
                     tile_features: str | Path | None = None, spec: DatasetSpec | None = None) -> dict[str, Any]:
    """Zero-shot, linear probe and k-shot of ``embedder`` on ``dataset``; writes ``out_dir``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    emb, source = embed_dataset(embedder, dataset, batch_size=settings.embedding.batch_size, tile_features=tile_features,
                                read_threads=settings.embedding.read_threads)
    y, classes = dataset.y, dataset.classes
    result: dict[str, Any] = {
        "status": "ok",
        "model": embedder.name,
        "dataset": dataset.name,
        "title": spec.title if spec else "",
        "citation": spec.citation if spec else "",
        "source": dataset.source,
        "n_tiles": len(dataset),
        "classes": classes,
        "class_counts": dataset.class_counts(),
        "mpp": dataset.mpp,
        "magnification": dataset.magnification,
        "has_split": dataset.split is not None,
        "embedder": embedder.describe(),
        "embedding_dim": int(emb.shape[1]),
        "embedding_source": source,
        "package_version": mrplip_core.__version__,
    }
    result["zero_shot"] = _zero_shot(embedder, emb, y, classes, prompts, settings)
    lp = settings.linear_probe
    result["linear_probe"] = linear_probe(emb, y, classes, dataset.split, lp) if lp.enabled else _skipped()
    fs = settings.few_shot
    result["few_shot"] = few_shot(emb, y, classes, dataset.split, fs, lp) if fs.enabled else _skipped()
    result["seconds"] = round(time.perf_counter() - t0, 3)
    write_outputs(result, dataset, out_dir)
    return result


def _skipped() -> dict[str, str]:
    return {"status": "skipped", "reason": "disabled in the config"}


def _zero_shot(embedder: ImageTextEmbedder, emb: np.ndarray, y: np.ndarray, classes: list[str],
               prompts: PromptSet | None, settings: EvaluationSettings) -> dict[str, Any]:
    if not settings.zero_shot.enabled:
        return _skipped()
    if not embedder.has_text:
        return {"status": "n/a", "reason": "no text side (a frozen image encoder cannot score class prompts)"}
    if prompts is None:
        return {"status": "n/a", "reason": "no prompt file configured for this dataset"}
    try:  # a prompt problem is this task's error: the probes of the dataset still run
        unused = prompts.check_labels(classes)
        pred = zero_shot_predict(emb, class_embeddings(embedder, prompts, classes))
    except PromptError as exc:
        return {"status": "error", "reason": str(exc)}
    extra = (f" Prompt classes without tiles here, not scored: {unused}." if unused else "")
    return {"status": "ok", "protocol_note": (f"prompt ensembles: {len(prompts.templates)} templates x class synonyms "
                                              f"({sum(prompts.n_prompts(c) for c in classes)} prompts) from {prompts.source}; "
                                              f"no training, every tile is a test tile; chosen among the dataset's "
                                              f"{len(classes)} labels.{extra}"),
            "unused_prompt_classes": unused,
            "n_prompts": {c: prompts.n_prompts(c) for c in classes},
            **classification_metrics(y, pred, classes), "predictions": pred.tolist()}


def write_outputs(result: dict[str, Any], dataset: TileDataset, out_dir: Path) -> None:
    """metrics.json, per_class.csv, predictions.csv and the confusion PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    preds = pd.DataFrame({"path": dataset.relative_paths(), "label": list(dataset.labels)})
    per_class = []
    classes = result["classes"]
    for task in ("zero_shot", "linear_probe"):
        r = result[task]
        if r.get("status") != "ok":
            continue
        p = np.asarray(r.pop("predictions"))
        preds[task] = [classes[i] if i >= 0 else "" for i in p]
        per_class += [{"task": task, **row} for row in r["per_class"]]
        png = confusion_png(r["confusion"], classes, out_dir / f"confusion_{task}.png",
                            f"{result['model']} on {result['dataset']}: {task.replace('_', ' ')}")
        r["confusion_png"] = png.name
    with_atomic_csv(preds, out_dir / "predictions.csv")
    with_atomic_csv(pd.DataFrame(per_class, columns=["task", "class", "precision", "recall", "f1", "support"]),
                    out_dir / "per_class.csv")
    write_json(result, out_dir / METRICS_JSON)


def skipped_dataset(model: str, spec: DatasetSpec, reason: str, out_dir: str | Path) -> dict[str, Any]:
    """metrics.json of a dataset that could not be evaluated (an optional dataset that is absent)."""
    result = {"status": "skipped", "model": model, "dataset": spec.name, "title": spec.title, "reason": reason,
              "source": spec.path}
    write_json(result, Path(out_dir) / METRICS_JSON)
    return result


def run_retrieval(embedder: ImageTextEmbedder, results: str | Path, settings: EvaluationSettings,
                  out_dir: str | Path, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Retrieval metrics of ``embedder`` into ``out_dir/metrics.json``."""
    t0 = time.perf_counter()
    r = settings.retrieval
    result = evaluate_retrieval(embedder, results, r, run_dir) if r.enabled else _skipped()
    result = {"model": embedder.name, "dataset": "retrieval", "embedder": embedder.describe(), **result,
              "seconds": round(time.perf_counter() - t0, 3)}
    write_json(result, Path(out_dir) / METRICS_JSON)
    return result


def write_json(obj: Any, path: str | Path) -> Path:
    return write_text(json.dumps(obj, indent=1, default=_json_default) + "\n", path)


def with_atomic_csv(df: pd.DataFrame, path: Path) -> Path:
    return write_text(df.to_csv(index=False), path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


# -- summary ------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["model", "dataset", "task", "status", "weighted_f1", "weighted_f1_std", "balanced_accuracy",
                   "accuracy", "recall", "n_test", "protocol", "note", "macro_auc", "auroc", "pointing"]


def summary_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows of one metrics.json (one per task; retrieval: one per direction and K)."""
    base = {"model": metrics.get("model"), "dataset": metrics.get("dataset")}
    if metrics.get("dataset") == SLIDES:
        return slide_summary_rows(metrics)
    if metrics.get("dataset") == "retrieval":
        if metrics.get("status") != "ok":
            return [{**base, "task": "retrieval", "status": metrics.get("status"), "note": metrics.get("reason", "")}]
        rows = []
        for direction in ("image_to_text", "text_to_image"):
            for k, v in metrics[direction].items():
                rows.append({**base, "task": f"retrieval {direction} {k}", "status": "ok", "recall": v,
                             "n_test": metrics["n_pairs"], "protocol": metrics["split"], "note": metrics["split_note"]})
        return rows
    if metrics.get("status") != "ok":
        return [{**base, "task": t, "status": metrics.get("status"), "note": metrics.get("reason", "")} for t in TASKS]
    rows = []
    for task in ("zero_shot", "linear_probe"):
        r = metrics[task]
        row = {**base, "task": task, "status": r.get("status"), "note": r.get("protocol_note", r.get("reason", ""))}
        if r.get("status") == "ok":
            row.update(weighted_f1=r["weighted_f1"], balanced_accuracy=r["balanced_accuracy"], accuracy=r["accuracy"],
                       n_test=r["n"], protocol=r.get("protocol", "zero-shot"))
        rows.append(row)
    fs = metrics["few_shot"]
    if fs.get("status") != "ok":
        rows.append({**base, "task": "few_shot", "status": fs.get("status"), "note": fs.get("reason", "")})
    else:
        for k, r in fs["shots"].items():
            rows.append({**base, "task": f"{k}-shot", "status": "ok", "weighted_f1": r["weighted_f1"]["mean"],
                         "weighted_f1_std": r["weighted_f1"]["std"], "balanced_accuracy": r["balanced_accuracy"]["mean"],
                         "accuracy": r["accuracy"]["mean"], "n_test": r["n_test"], "protocol": f"{r['n_seeds']} seeds",
                         "note": fs["protocol_note"]})
    return rows


def collect_metrics(eval_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``{model}/{dataset}/metrics.json`` under ``eval_dir``, sorted by model then dataset."""
    out = []
    for path in sorted(Path(eval_dir).glob(METRICS_GLOB)):
        try:
            out.append(json.loads(path.read_text()) | {"_dir": str(path.parent)})
        except json.JSONDecodeError as exc:
            log.warning("skipping unreadable %s: %s", path, exc)
    return out


def write_summary(metrics_files: list[str | Path], out: str | Path) -> pd.DataFrame:
    """``summary.csv`` of the given metrics.json files."""
    rows = []
    for path in metrics_files:
        rows += summary_rows(json.loads(Path(path).read_text()))
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    df["n_test"] = df["n_test"].astype("Int64")
    with_atomic_csv(df, Path(out))
    return df
