"""``mrplip report``: the static HTML report; :func:`register` adds the verb to the main parser.

    mrplip report --settings JSON --results results --out results/report

``--settings`` is JSON of the config sections, keyed by name (the rule passes
``{"evaluation": ..., "features": ...}``); the report reads ``evaluation.report``,
``evaluation.datasets``, ``evaluation.runs`` and ``evaluation.baselines``. Nothing heavy is
imported until the verb runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def _evaluation_settings(text: str) -> Any:
    """EvaluationSettings from the ``evaluation`` section of ``--settings``."""
    from mrplip_core.evaluation.settings import EvaluationSettings
    from mrplip_core.jobs import read_sections

    return EvaluationSettings.from_dict(read_sections(text, "evaluation", verb="report")["evaluation"])


def _cmd_report(a: argparse.Namespace) -> int:
    from mrplip_core.layout import Layout
    from mrplip_core.report import build_report

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _evaluation_settings(a.settings)
    runs = a.runs.split(",") if a.runs else (list(settings.runs) if settings.runs is not None else None)
    baselines = a.baselines.split(",") if a.baselines else (list(settings.baselines) if settings.baselines is not None
                                                            else None)
    out = a.out or Layout(a.results).report_dir
    path = build_report(a.results, out, settings=settings.report, runs=runs, baselines=baselines,
                        datasets=settings.datasets)
    print(f"report -> {path} (open it in a browser: file://{path.resolve()})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``report``."""
    from mrplip_core.layout import Layout

    s = sub.add_parser("report", help=f"the static HTML report ({Layout().report})")
    s.add_argument("--results", default="results", help="the workflow's results folder")
    s.add_argument("--out", default=None, help="output folder (default RESULTS/report)")
    s.add_argument("--runs", default=None, help="comma-separated pretrain runs to show (default: evaluation.runs, else all)")
    s.add_argument("--baselines", default=None,
                   help="comma-separated frozen encoders to show (default: evaluation.baselines, else all on disk)")
    s.add_argument("--settings", default="", help="JSON of {evaluation: ..., features: ...} (the config's sections)")
    s.set_defaults(func=_cmd_report)
