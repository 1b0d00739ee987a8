"""The report's slide-level section: each PathFLIP run, its slides (used, held out, left out and
why), sample slides with every sub-caption's heatmap and top patches, and the slide-level metric
table beside the MR-PLIP baselines (``results/eval/summary.csv``, dataset ``slides``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mrplip_core.evaluation.plan import SLIDES
from mrplip_core.report.context import ReportContext
from mrplip_core.report.html import esc, figure, fmt, missing, note, section, table
from mrplip_core.use.localize import heatmap_png, region_indices, slide_background
from mrplip_core.use.models import load_model
from mrplip_core.use.patches import read_slide_patches

ANCHOR, TITLE = "pathflip", "PathFLIP: sub-captions in their slides"
TOP_PATCHES = 3  # top patches shown per sub-caption


def _runs(ctx: ReportContext) -> list[Path]:
    every = ctx.layout.pathflip_dir("*")
    return sorted(p for p in every.parent.glob(every.name) if (p / "model.safetensors").exists()) if every.parent.is_dir() else []


def _patch_crops(ctx: ReportContext, slide: str, patches, order: np.ndarray, key: str) -> str:
    """Thumbnails of the top patches read from the slide file (none when it does not open)."""
    from mrplip_core.wsi.slide import Slide, SlideError

    table_path = ctx.layout.slides_table
    if not table_path.exists():
        return ""
    rows = pd.read_parquet(table_path)
    row = rows[rows["slide_id"].astype(str) == slide]
    if not len(row) or not isinstance(row["path"].iloc[0], str) or not Path(row["path"].iloc[0]).exists():
        return ""
    mpp = row["mpp"].iloc[0] if "mpp" in row else None
    out = []
    try:
        with Slide(row["path"].iloc[0], slide, mpp=None if pd.isna(mpp) else float(mpp)) as s:
            for rank, i in enumerate(order[:TOP_PATCHES]):
                side = ctx.settings.thumbnail_px // 2
                crop = s.read_region(int(patches.x[i]), int(patches.y[i]), int(patches.size[i]), side)
                src = ctx.save_array(np.asarray(crop)[..., :3], f"pathflip_{key}_{rank}.jpg", side)
                out.append(figure(src, f"#{rank + 1} {patches.magnification[i]:g}x", alt="top patch"))
    except (SlideError, OSError, ValueError) as exc:
        return note(f"top patches not shown: {esc(exc)}")
    return "".join(out)


def _sample_slides(ctx: ReportContext, run_dir: Path) -> str:
    table = pd.read_parquet(run_dir / "slides.parquet")
    used = table[table["status"] == "ok"].sort_values(["split", "slide_id"], ascending=[False, True])  # val first
    model = load_model(run_dir, ctx.results)
    parts = []
    for slide in used["slide_id"].head(ctx.settings.sample_bags):
        split = used.loc[used["slide_id"] == slide, "split"].iloc[0]
        subs = pd.read_parquet(ctx.layout.subcaptions(slide))["text"].astype(str).tolist()
        if not subs:
            continue
        patches = read_slide_patches(ctx.results, model.image_encoder, slide, model.magnifications)
        scores = model.patch_scores(patches.features, patches.magnification, subs)
        background = slide_background(ctx.results, slide, patches.extent, 8.0)
        rows = []
        for q, text in enumerate(subs):
            region = region_indices(scores[q], 0.1)
            key = f"{run_dir.name}_{slide}_{q}"
            src = ctx.save_array(heatmap_png(*background, patches, scores[q], region, text), f"pathflip_{key}.png",
                                 ctx.settings.qc_width_px)
            order = np.argsort(-scores[q], kind="stable")
            crops = _patch_crops(ctx, slide, patches, order, key)
            top = ", ".join(f"{patches.magnification[i]:g}x ({int(patches.x[i])}, {int(patches.y[i])})"
                            for i in order[:TOP_PATCHES])
            rows.append(f'<div class="pf-row"><p><b>{esc(text)}</b></p>{figure(src, "heatmap over the slide", alt=text)}'
                        f"{crops}<p class=\"muted\">top patches (level-0 px): {esc(top)}</p></div>")
        parts.append(f"<h4>{esc(slide)} <small>({esc(split or 'train')})</small></h4>" + "".join(rows))
    return "".join(parts)


def _metrics(ctx: ReportContext) -> str:
    path = ctx.layout.eval_summary
    if not path.exists():
        return missing(f"{path} not written yet (snakemake evaluate)")
    df = pd.read_csv(path)
    df = df[df["dataset"] == SLIDES]
    if df.empty:
        return missing("no slide-level rows in the evaluation summary (evaluation.slides)")
    for column in ("auroc", "pointing"):  # localisation columns (summaries written before they existed lack them)
        if column not in df.columns:
            df[column] = float("nan")
    rows = [(r.model, r.task, r.status, fmt(r.weighted_f1), fmt(r.balanced_accuracy), fmt(r.macro_auc), fmt(r.recall),
             fmt(r.auroc), fmt(r.pointing), "" if pd.isna(r.protocol) else r.protocol, "" if pd.isna(r.note) else r.note)
            for r in df.itertuples(index=False)]
    return table(["model", "task", "status", "weighted F1", "balanced acc.", "macro AUC", "recall",
                  "localisation AUROC", "pointing", "protocol", "note"], rows, numeric=(3, 4, 5, 6, 7, 8))


def pathflip(ctx: ReportContext) -> str:
    """The section (see the module docstring)."""
    runs = _runs(ctx)
    if not runs:
        return section(ANCHOR, TITLE, missing("no finished PathFLIP run under results/pathflip/ (snakemake pathflip)"))
    body = []
    for run_dir in runs:
        table_ = pd.read_parquet(run_dir / "slides.parquet")
        counts = table_.assign(split=table_["split"].where(table_["status"] == "ok", "")).groupby(
            ["status", "split"]).size().reset_index(name="slides")
        left = table_[table_["status"] != "ok"]
        body.append(f"<h3>Run {esc(run_dir.name)}</h3>")
        body.append(table(["status", "split", "slides"], counts.itertuples(index=False), numeric=(2,)))
        if len(left):
            body.append(table(["slide", "left out because", "reason"],
                              left[["slide_id", "status", "reason"]].head(ctx.settings.max_slide_rows).itertuples(index=False)))
        body.append(_sample_slides(ctx, run_dir))
    body.append("<h3>Slide-level metrics</h3>")
    body.append(_metrics(ctx))
    lead = ("Each sub-caption of a slide's caption pools the slide's patches; the pooling's weights, drawn over the "
            "slide, show where the model places the sentence (JET colour map, min-max per query; the top 10% of "
            "patches outlined). Held-out slides come first. The metric table compares the PathFLIP run with the "
            "MR-PLIP runs at slide level.")
    return section(ANCHOR, TITLE, "".join(body), lead)
