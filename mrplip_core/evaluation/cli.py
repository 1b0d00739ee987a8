"""``mrplip`` verbs of the evaluation stage; :func:`register` adds them to the main parser.

    mrplip eval-features --dataset nct_crc --encoder uni --settings JSON --out results/eval/features/uni/nct_crc.h5
    mrplip evaluate --model frozen-uni --dataset nct_crc --settings JSON --out results/eval/frozen-uni/nct_crc
    mrplip evaluate-retrieval --model myrun --settings JSON --out results/eval/myrun/retrieval
    mrplip eval-summary --out results/eval/summary.csv results/eval/*/*/metrics.json

``--settings`` is JSON of the config sections ``{"evaluation": ..., "features": ...}``, keyed
by section name (the rules pass it). Nothing heavy is imported until a verb runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from mrplip_core.layout import RESULTS, RETRIEVAL, Layout


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _settings(a: argparse.Namespace) -> tuple[Any, Any]:
    """(EvaluationSettings, FeatureSettings) from ``--settings``."""
    from mrplip_core.evaluation.settings import EvaluationSettings
    from mrplip_core.features.settings import FeatureSettings

    from mrplip_core.jobs import read_sections

    sections = read_sections(a.settings, "evaluation", "features", verb=a.verb)
    return EvaluationSettings.from_dict(sections["evaluation"]), FeatureSettings.from_dict(sections["features"])


def _start(a: argparse.Namespace) -> tuple[Any, Any]:
    """Logging to stderr, ``--threads`` torch threads; the verb's (EvaluationSettings, FeatureSettings)."""
    import torch

    _logging()
    torch.set_num_threads(max(1, a.threads))
    return _settings(a)


def _dataset(settings: Any, name: str) -> tuple[Any, Any, str | None]:
    """(spec, TileDataset or None, reason) for a configured dataset."""
    from mrplip_core.evaluation.datasets import TileDataset

    spec = settings.dataset(name)
    if spec.optional and not Path(spec.path).expanduser().exists():
        return spec, None, f"optional dataset: {spec.path} does not exist here"
    return spec, TileDataset.load(spec), None


def _cmd_eval_features(a: argparse.Namespace) -> int:
    from mrplip_core.evaluation.embedders import FrozenImageEncoder
    from mrplip_core.evaluation.tile_features import compute_tile_features

    settings, features = _start(a)
    spec, dataset, reason = _dataset(settings, a.dataset)
    if dataset is None:
        print(f"mrplip eval-features: {reason}", file=sys.stderr)
        return 2
    encoder = FrozenImageEncoder.load(a.encoder, features, settings.embedding)
    s = compute_tile_features(dataset, encoder, a.out, read_threads=settings.embedding.read_threads)
    print(f"{spec.name}: {s['n']} tiles through {s['encoder']} (D={s['dim']}) -> {a.out}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from mrplip_core.evaluation.embedders import build_embedder
    from mrplip_core.evaluation.prompts import PromptSet
    from mrplip_core.evaluation.run import METRICS_JSON, evaluate_dataset, skipped_dataset

    settings, features = _start(a)
    spec, dataset, reason = _dataset(settings, a.dataset)
    out = Path(a.out or Layout(a.results).eval_result_dir(a.model, a.dataset))
    if dataset is None:
        skipped_dataset(a.model, spec, reason or "", out)
        print(f"{a.model} on {spec.name}: skipped ({reason}) -> {out / METRICS_JSON}")
        return 0
    embedder = build_embedder(a.model, results=a.results, features=features, embedding=settings.embedding)
    prompt_file = a.prompts or spec.prompts
    prompts = PromptSet.read(prompt_file) if prompt_file else None
    r = evaluate_dataset(embedder, dataset, settings, out, prompts=prompts, tile_features=a.tile_features, spec=spec)
    for task in ("zero_shot", "linear_probe"):
        t = r[task]
        summary = (f"weighted F1 {t['weighted_f1']:.3f}, balanced accuracy {t['balanced_accuracy']:.3f} (n={t['n']})"
                   if t.get("status") == "ok" else f"{t.get('status')}: {t.get('reason', '')}")
        print(f"{a.model} on {spec.name}, {task}: {summary}")
    print(f"-> {out}")
    return 0


def _cmd_evaluate_retrieval(a: argparse.Namespace) -> int:
    from mrplip_core.evaluation.embedders import build_embedder
    from mrplip_core.evaluation.run import run_retrieval

    settings, features = _start(a)
    out = Path(a.out or Layout(a.results).eval_result_dir(a.model, RETRIEVAL))
    embedder = build_embedder(a.model, results=a.results, features=features, embedding=settings.embedding)
    run_dir = Layout(a.results).run_dir(a.model)
    r = run_retrieval(embedder, a.results, settings, out, run_dir if run_dir.is_dir() else None)
    if r.get("status") == "ok":
        print(f"{a.model} retrieval on {r['n_pairs']} pairs: image->text {r['image_to_text']}, text->image {r['text_to_image']}")
    else:
        print(f"{a.model} retrieval: {r.get('status')}: {r.get('reason', '')}")
    return 0


def _cmd_evaluate_slides(a: argparse.Namespace) -> int:
    import pandas as pd

    from mrplip_core.evaluation.plan import SLIDES
    from mrplip_core.evaluation.run import write_json
    from mrplip_core.evaluation.slides import evaluate_slides

    settings, _ = _start(a)
    layout = Layout(a.results)
    held_out: list[str] = []
    if a.pathflip_run:
        table = pd.read_parquet(layout.pathflip_slides(a.pathflip_run))
        held_out = table.loc[(table["status"] == "ok") & (table["split"] == "val"), "slide_id"].tolist()
    r = evaluate_slides(a.model, a.results, a.table, settings, held_out)
    out = Path(a.out) if a.out else layout.eval_metrics(a.model, SLIDES)
    write_json(r, out)
    for column, task in r["labels"].items():
        for kind in ("zero_shot", "linear_probe"):
            t = task[kind]
            print(f"{a.model} slides {kind} {column}: {t.get('status')} "
                  f"{t.get('weighted_f1', '')} {t.get('reason', '')}".rstrip())
    print(f"{a.model} slide retrieval: {r['retrieval'].get('status')} {r['retrieval'].get('caption_to_slide', '')}")
    return 0


def _cmd_eval_summary(a: argparse.Namespace) -> int:
    from mrplip_core.evaluation.run import write_summary

    df = write_summary(a.metrics, a.out)
    print(f"{len(df)} rows from {len(a.metrics)} metrics files -> {a.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval-features``, ``evaluate``, ``evaluate-retrieval`` and ``eval-summary``."""
    settings_help = "JSON of {evaluation: ..., features: ...} (the config's sections)"

    s = sub.add_parser("eval-features", help="frozen-encoder features of an evaluation tile set (HDF5)")
    s.add_argument("--dataset", required=True, help="a key of evaluation.datasets")
    s.add_argument("--encoder", required=True, help="image encoder registry name")
    s.add_argument("--out", required=True, help=f"the features file ({Layout().pattern('eval_tile_features')})")
    s.add_argument("--settings", default="", help=settings_help)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=_cmd_eval_features)

    s = sub.add_parser("evaluate", help="zero-shot, linear probe and k-shot of one model on one tile set")
    s.add_argument("--model", required=True, help="frozen-{encoder} (baseline) or a pretrain run name")
    s.add_argument("--dataset", required=True, help="a key of evaluation.datasets")
    s.add_argument("--results", default=RESULTS, help="the workflow's results folder")
    s.add_argument("--out", default=None, help="output folder (default RESULTS/eval/MODEL/DATASET)")
    s.add_argument("--tile-features", default=None, help="cached frozen features of the tiles (eval-features)")
    s.add_argument("--prompts", default=None, help="zero-shot prompt JSON; default: the dataset's evaluation.datasets.{name}.prompts")
    s.add_argument("--settings", default="", help=settings_help)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("evaluate-retrieval", help="image<->text recall@K on held-out patch/caption pairs")
    s.add_argument("--model", required=True, help="a pretrain run name")
    s.add_argument("--results", default=RESULTS)
    s.add_argument("--out", default=None, help="output folder (default RESULTS/eval/MODEL/retrieval)")
    s.add_argument("--settings", default="", help=settings_help)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=_cmd_evaluate_retrieval)

    s = sub.add_parser("evaluate-slides", help="slide-level zero-shot, linear probe and caption<->slide retrieval")
    s.add_argument("--model", required=True, help="pathflip-{run} (a PathFLIP run) or an MR-PLIP pretrain run name")
    s.add_argument("--table", required=True, help="the slide table (its label columns: evaluation.slides.labels)")
    s.add_argument("--results", default=RESULTS)
    s.add_argument("--pathflip-run", default=None, help="the PathFLIP run whose held-out slides retrieval uses")
    s.add_argument("--out", default=None, help="metrics.json (default RESULTS/eval/MODEL/slides/metrics.json)")
    s.add_argument("--settings", default="", help=settings_help)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=_cmd_evaluate_slides)

    s = sub.add_parser("eval-summary", help="one CSV row per (model, dataset, task) from metrics.json files")
    s.add_argument("metrics", nargs="*", help="metrics.json files")
    s.add_argument("--out", required=True, help=f"the summary CSV ({Layout().eval_summary})")
    s.set_defaults(func=_cmd_eval_summary)
