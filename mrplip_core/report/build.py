"""Build ``results/report/index.html``: one static page, pictures in ``img/`` beside it.

    from mrplip_core.report import build_report
    build_report("results", "results/report")

The page is written atomically. A section whose inputs do not exist says so; a section that
fails on unexpected input shows the error in the page (and the log) instead of stopping
the report, so one broken artifact never hides the rest.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import mrplip_core
from mrplip_core.evaluation.settings import DatasetSpec, ReportSettings
from mrplip_core.io.atomic import remove_stale_temps, write_text
from mrplip_core.layout import TEMPLATES
from mrplip_core.report import evaluation as ev
from mrplip_core.report import pathflip, sections
from mrplip_core.report.context import ReportContext
from mrplip_core.report.html import esc, page, section

log = logging.getLogger(__name__)

#: (anchor, navigation title, section function), in page order.
SECTIONS: list[tuple[str, str, Callable[[ReportContext], str]]] = [
    ("overview", "Overview", sections.overview),
    ("slides", "Slides & QC", sections.slides),
    ("bags", "Bags & captions", sections.bags),
    ("pretrain", "Pretraining", sections.pretraining),
    ("evaluation", "Evaluation", ev.evaluation),
    (pathflip.ANCHOR, "PathFLIP", pathflip.pathflip),
    ("published", "Published figures", ev.published),
]

DEFAULT_ATTRIBUTION = (
    "NCT-CRC-HE-100K: Kather et al. 2018, Zenodo 1214456 (CC-BY-4.0). "
    "Kather 2016 colorectal textures: Kather et al. 2016, Zenodo 53169 (CC-BY-4.0)."
)


def build_report(results: str | Path, out: str | Path, *, settings: ReportSettings | None = None,
                 runs: Sequence[str] | None = None, baselines: Sequence[str] | None = None,
                 datasets: Sequence[DatasetSpec] = (),
                 eval_dir: str | Path | None = None, title: str = "MR-PLIP report") -> Path:
    """Write ``out/index.html`` (and ``out/img/``) from the results folder; returns the page path."""
    remove_stale_temps(out)  # pictures of a report job that was killed while writing them
    ctx = ReportContext(Path(results), Path(out), settings or ReportSettings(), Path(eval_dir) if eval_dir else None,
                        list(runs) if runs is not None else None, tuple(datasets),
                        list(baselines) if baselines is not None else None)
    html_sections = []
    for anchor, name, fn in SECTIONS:
        try:
            html_sections.append(fn(ctx))
        except Exception as exc:  # noqa: BLE001 - a report shows what broke instead of stopping
            log.error("report section %s failed:\n%s", anchor, traceback.format_exc())
            html_sections.append(section(anchor, name, f'<div class="error">This section could not be built: '
                                                       f"{esc(type(exc).__name__)}: {esc(exc)}</div>"))
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (f"Multi-resolution pathology-language pretraining &middot; mrplip {esc(mrplip_core.__version__)} "
                f"&middot; generated {esc(now)} from <code style='color:#fff;background:none'>{esc(ctx.results)}</code>")
    citations = sorted({d.citation for d in datasets if d.citation}) or [DEFAULT_ATTRIBUTION]
    footer = ("Data attribution: " + "; ".join(esc(c) for c in citations)
              + "<br>Method: MR-PLIP, CVPR 2025 (arXiv 2504.18856); this pipeline is an independent implementation.")
    path = Path(out) / Path(TEMPLATES["report"]).name  # index.html, the layout's report below its folder
    write_text(page(title, subtitle, [(a, n) for a, n, _ in SECTIONS], html_sections, footer), path)
    return path
