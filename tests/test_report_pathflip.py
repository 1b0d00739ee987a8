"""The report's PathFLIP section on the planted corpus: the run's slide table, every held-out
slide's sub-captions with a heatmap each, the slide-level metric rows; rendered in headless
Chromium when it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess

import pandas as pd
import pytest

from mrplip_core.evaluation.run import write_summary
from mrplip_core.evaluation.settings import EvaluationSettings, ReportSettings
from mrplip_core.evaluation.slides import evaluate_slides
from mrplip_core.io.atomic import write_text
from mrplip_core.layout import Layout
from mrplip_core.report import build_report
from mrplip_core.testing.pathflip_corpus import tiny_pathflip_settings, write_pathflip_corpus
from mrplip_core.train.pathflip import train_pathflip
from mrplip_core.train.pathflip_config import PathflipTrainConfig

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_the_pathflip_section_shows_sub_captions_heatmaps_and_slide_metrics(tmp_path):
    results = write_pathflip_corpus(tmp_path / "results", n_slides=8)
    layout = Layout(results)
    captions = pd.read_parquet(layout.slide_captions)
    captions.loc[0, ["status", "reason"]] = ["too_long", "20000 characters"]
    captions.to_parquet(layout.slide_captions)
    settings = tiny_pathflip_settings(results, train={"steps": 3})
    settings["run"] = "planted"
    train_pathflip(PathflipTrainConfig.from_dict(settings), layout.pathflip_dir("planted"))
    table = tmp_path / "slides.tsv"
    pd.DataFrame({"slide_id": captions["slide_id"], "path": "x.svs", "site": "one"}).to_csv(table, sep="\t", index=False)
    metrics = evaluate_slides("pathflip-planted", results, table, EvaluationSettings.from_dict({"slides": {"labels": {"site": None}}}))
    import json

    write_text(json.dumps(metrics, default=float), layout.eval_metrics("pathflip-planted", "slides"))
    write_summary([layout.eval_metrics("pathflip-planted", "slides")], layout.eval_summary)

    page = build_report(results, tmp_path / "report", settings=ReportSettings(sample_bags=2))
    html = page.read_text()
    section = html.split('<section id="pathflip">')[1].split("</section>")[0]
    assert 'class="error"' not in section
    assert "caption_too_long" in section and "20000 characters" in section
    heatmaps = re.findall(r'src="(img/pathflip_planted_[^"]+\.png)"', section)
    used = pd.read_parquet(layout.pathflip_slides("planted")).query("status == 'ok'")
    shown = used.sort_values(["split", "slide_id"], ascending=[False, True])["slide_id"].head(2)  # held-out first
    subs = sum(len(pd.read_parquet(layout.subcaptions(s))) for s in shown)
    assert len(heatmaps) == subs >= 4 and all((page.parent / h).is_file() for h in heatmaps)
    assert "slide retrieval caption_to_slide R@1" in section and "1 class(es)" in section
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium: the page was checked as HTML only")
    shot = tmp_path / "shot.png"
    subprocess.run([str(REPO / "scripts" / "report-screenshot"), str(page), str(shot), "1200", "pathflip"], check=True,
                   env={"CHROMIUM": chromium, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert shot.stat().st_size > 10_000
