"""Report sections about the data and the pretraining: overview, slides and tissue QC,
multi-resolution bags with captions, loss curves. Each returns HTML; a section whose inputs
are not there yet says which file is missing and which stage makes it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from mrplip_core.evaluation.run import METRICS_GLOB
from mrplip_core.io.names import safe_filename
from mrplip_core.layout import Layout
from mrplip_core.report.context import ReportContext
from mrplip_core.report.figures import loss_curves_png
from mrplip_core.report.html import badge, esc, figure, fmt, missing, na, note, section, table
from mrplip_core.train.summary import LOSS_COLUMNS, read_metrics, read_run_config, run_summary

log = logging.getLogger(__name__)


#: The layout's patterns as the page shows them (``results/tiles/{slide}.parquet``), whatever
#: the results folder the report reads.
SHOWN = Layout()


def _shown_folder(name: str) -> str:
    """The folder of artifact ``name`` as the page shows it (``results/tiles``)."""
    return os.path.dirname(SHOWN.pattern(name))


def _count(every: Path) -> int:
    """How many files match ``every``, a layout path with ``*`` for its wildcards."""
    first = next(i for i, part in enumerate(every.parts) if "*" in part)
    folder = Path(*every.parts[:first])
    return len(list(folder.glob("/".join(every.parts[first:])))) if folder.is_dir() else 0


def overview(ctx: ReportContext) -> str:
    """What exists in the results folder, stage by stage."""
    r, layout = ctx.results, ctx.layout
    encoders = layout.image_features_dir("*")
    feature_dirs = sorted(p.name for p in encoders.parent.glob(encoders.name) if p.is_dir()) if encoders.parent.is_dir() else []
    runs = ctx.run_dirs()
    finished = [p.name for p in runs if layout.model(p.name).exists()]
    n_eval = _count(ctx.eval_dir / METRICS_GLOB)
    rows = [
        ("slides", SHOWN.pattern("slides_table"), "1 file" if layout.slides_table.exists() else "", "snakemake tiles"),
        ("tiles", SHOWN.pattern("tiles"), f"{_count(layout.tiles('*'))} slides", "snakemake tiles"),
        ("tissue QC", SHOWN.pattern("tissue_qc"), f"{_count(layout.tissue_qc('*'))} slides", "snakemake tiles"),
        ("captions", SHOWN.pattern("captions"), f"{_count(layout.captions('*'))} slides", "snakemake captions"),
        ("keywords", SHOWN.pattern("keywords"), f"{_count(layout.keywords('*'))} slides", "snakemake captions"),
        ("image features", SHOWN.pattern("image_features"),
         ", ".join(f"{e}: {_count(layout.image_features(e, '*'))} slides" for e in feature_dirs), "snakemake features"),
        ("pretraining", SHOWN.pattern("run_dir") + "/", f"{len(runs)} runs, {len(finished)} finished" if runs else "",
         "snakemake pretrain"),
        ("evaluation", SHOWN.pattern("eval_metrics"), f"{n_eval} results" if n_eval else "",
         "snakemake evaluate"),
    ]
    body = []
    for stage, artifact, found, command in rows:
        empty = found in ("", "0 slides") or found.startswith("0 ")
        status = badge("not yet", "warn") + f" <span class='na'>run <code>{esc(command)}</code></span>" if empty else esc(found)
        body.append((esc(stage), f"<code>{esc(artifact)}</code>", status))
    return section("overview", "What this report is built from", table(["stage", "artifact", "found"], body, raw=True),
                   lead=f"Results folder <code>{esc(r)}</code>. Sections below whose inputs are missing say so.")


def slides(ctx: ReportContext) -> str:
    """The slide table and tissue QC thumbnails (mask outline, chosen parents)."""
    path = ctx.layout.slides_table
    if not path.exists():
        return section("slides", "Slides and tissue QC", missing(
            f"<code>{esc(SHOWN.pattern('slides_table'))}</code> does not exist yet: run <code>snakemake tiles</code>."))
    df = pd.read_parquet(path)
    limit = ctx.settings.max_slide_rows
    failed = df["status"] != "ok" if "status" in df else pd.Series(False, index=df.index)
    shown = pd.concat([df[failed], df[~failed]]).head(max(limit, int(failed.sum())))  # failures always listed
    rows = []
    for rec in shown.to_dict("records"):
        rec = {k: _clean(v) for k, v in rec.items()}
        kind = {"ok": "ok", "no_parents": "warn"}.get(str(rec.get("status")), "bad")  # no_parents: read, no tissue box
        status = badge(str(rec.get("status")), kind)
        mags = rec.get("magnifications")
        mags = ", ".join(f"{float(m):g}x" for m in mags) if mags is not None and len(mags) else "–"
        rows.append((esc(rec.get("slide_id")), status, esc(rec.get("vendor") or "–"), esc(fmt(rec.get("mpp"), 4)),
                     esc(mags), esc(fmt(rec.get("n_parents"))), esc(fmt(rec.get("n_patches"))),
                     esc(fmt(rec.get("tissue_fraction"), 2)), esc(rec.get("error") or rec.get("reason") or "")))
    n_ok = int((df["status"] == "ok").sum()) if "status" in df else 0
    body = table(["slide", "status", "vendor", "um/px", "magnifications", "parents", "patches", "tissue", "error or reason"], rows,
                 raw=True, numeric=(3, 5, 6, 7))
    if len(shown) < len(df):
        body += note(f"{len(df) - len(shown)} more usable slides are in <code>{esc(SHOWN.pattern('slides_table'))}</code> "
                     "(evaluation.report.max_slide_rows).")
    figs = []
    for sid in df["slide_id"].astype(str).tolist()[: ctx.settings.max_qc_slides]:
        png = ctx.layout.tissue_qc(sid)
        if png.exists():
            src = ctx.copy_image(png, f"qc_{safe_filename(sid)}.png", max_width=2 * ctx.settings.qc_width_px)
            figs.append(figure(src, esc(sid), width=ctx.settings.qc_width_px))
        else:
            absent = na(f"{SHOWN.pattern('tissue_qc', slide=sid)} is missing", "no QC image")
            figs.append(f"<figure>{absent}<figcaption>{esc(sid)}</figcaption></figure>")
    more = len(df) - ctx.settings.max_qc_slides
    body += "<h3>Tissue QC</h3>" + (f'<div class="grid">{"".join(figs)}</div>' if figs else missing("no QC images"))
    if more > 0:
        body += note(f"{more} more slides are listed above but not drawn (evaluation.report.max_qc_slides).")
    return section("slides", "Slides and tissue QC", body,
                   lead=f"{len(df)} slides, {n_ok} usable. QC thumbnails show the detected tissue outline and the "
                        "parent patches chosen for the visual bags.")


def _clean(value):
    """pandas missing values (NA, NaN, None) as None; arrays and lists unchanged."""
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, str):
        return value
    return None if pd.isna(value) else value


def _chain(manifest: pd.DataFrame, bag_id: str) -> list[pd.Series]:
    """The bag's parent and, at each next magnification, the child of the previous patch with
    the most tissue (the path a pathologist zooming in would follow)."""
    bag = manifest[manifest["bag_id"] == bag_id]
    parent = bag[bag["depth"] == bag["depth"].min()].iloc[0]
    chain = [parent]
    while True:
        kids = bag[bag["parent_id"] == chain[-1]["patch_id"]]
        if kids.empty:
            return chain
        chain.append(kids.sort_values(["tissue_fraction", "patch_id"], ascending=[False, True]).iloc[0])


def bags(ctx: ReportContext) -> str:
    """Sample visual bags: parent -> child chains, each patch with its caption, and bag keywords."""
    from mrplip_core.wsi.records import read_patch_image

    title, anchor = "Multi-resolution bags and their captions", "bags"
    manifests = ctx.layout.tiles("*")
    per_slide: dict[str, pd.DataFrame] = {}  # the first sample_bags slides that have patches
    for path in sorted(manifests.parent.glob(manifests.name)) if manifests.parent.is_dir() else []:
        manifest = pd.read_parquet(path)
        if len(manifest):
            per_slide[path.stem] = manifest
        if len(per_slide) == ctx.settings.sample_bags:
            break
    if not per_slide:
        return section(anchor, title, missing(f"No tile manifests with patches in <code>{esc(_shown_folder('tiles'))}/</code> "
                                               "yet: run <code>snakemake tiles</code>."))
    # one bag per slide, round-robin, until sample_bags are chosen
    chosen: list[tuple[str, str]] = []
    depth = 0
    while len(chosen) < ctx.settings.sample_bags and depth < 64:
        for sid, man in per_slide.items():
            roots = man.loc[man["depth"] == man["depth"].min(), "bag_id"].drop_duplicates().tolist()
            if depth < len(roots) and len(chosen) < ctx.settings.sample_bags:
                chosen.append((sid, roots[depth]))
        depth += 1
    any_captions = False
    blocks = []
    side = ctx.settings.thumbnail_px
    for sid, bag_id in chosen:
        man = per_slide[sid]
        chain = _chain(man, bag_id)
        caps = _captions(ctx.layout.captions(sid), [str(p["patch_id"]) for p in chain])
        any_captions |= bool(caps)
        figs = []
        for p in chain:
            pid = str(p["patch_id"])
            label = f"<b>{float(p['magnification']):g}x</b> &middot; {fmt(float(p['mpp']), 2)} um/px"
            caption = caps.get(pid)
            text = esc(caption) if caption else na("no caption for this patch yet", "no caption yet")
            try:
                img = read_patch_image(ctx.layout, sid, pid)
                src = ctx.save_array(img, f"patch_{safe_filename(pid)}.jpg", side * 2)
                figs.append(figure(src, f"{label}<br>{text}", width=side, alt=pid, style=f"width:{side + 60}px"))
            except Exception as exc:  # slide moved or unreadable: say so in the page
                figs.append(f'<figure style="width:{side + 60}px"><div class="error">cannot read patch: {esc(exc)}</div>'
                            f"<figcaption>{label}<br>{text}</figcaption></figure>")
        kws = _keywords(ctx.layout.keywords(sid), bag_id)
        kw_html = f'<p class="kw">bag keywords: {esc(", ".join(kws))}</p>' if kws else ""
        blocks.append(f"<h4>{esc(sid)} &middot; bag {esc(bag_id)}</h4>{kw_html}<div class=\"bag\">{''.join(figs)}</div>")
    lead = ("Each row is one visual bag: the parent patch at the lowest magnification and, at every next magnification, "
            "the child with the most tissue. Captions are the captioning stage's text for that patch.")
    body = "".join(blocks)
    if not any_captions:
        body = missing(f"No captions in <code>{esc(_shown_folder('captions'))}/</code> yet: "
                       "run <code>snakemake captions</code>.") + body
    return section(anchor, title, body, lead=lead)


def _captions(path: Path, patch_ids: list[str]) -> dict[str, str]:
    if not path.exists():
        return {}
    df = pd.read_parquet(path, columns=["patch_id", "caption"])
    df = df[df["patch_id"].isin(patch_ids) & df["caption"].notna()]
    return dict(zip(df["patch_id"].astype(str), df["caption"].astype(str)))


def _keywords(path: Path, bag_id: str, n: int = 14) -> list[str]:
    if not path.exists():
        return []
    df = pd.read_parquet(path)
    df = df[df["bag_id"] == bag_id]
    if df.empty:
        return []
    support = df["patch_ids"].map(lambda v: len(v) if v is not None else 0)
    return df.assign(n=support).sort_values(["n", "keyword"], ascending=[False, True])["keyword"].head(n).tolist()


def pretraining(ctx: ReportContext) -> str:
    """Runs (what each one trained: magnifications, loss terms) and their loss curves per term."""
    title, anchor = "Pretraining runs and loss curves", "pretrain"
    runs = [d for d in ctx.run_dirs() if d.exists()]
    if not runs:
        return section(anchor, title, missing(f"No pretraining runs in <code>{esc(_shown_folder('run_dir'))}/</code> yet: "
                                               "run <code>snakemake pretrain</code>."))
    rows, figs = [], []
    for d in runs:
        try:
            summary = run_summary(read_run_config(d))
        except FileNotFoundError:
            summary = {}
        metrics_csv = ctx.layout.run_metrics(d.name)
        metrics = read_metrics(d)
        metrics = pd.DataFrame() if metrics is None else metrics
        last = metrics.iloc[-1] if len(metrics) else None
        finished = ctx.layout.model(d.name).exists()
        steps_done = int(last["step"]) if last is not None else 0
        final = {c: float(last[c]) for c in LOSS_COLUMNS if last is not None and c in metrics.columns and pd.notna(last[c])}
        rows.append((
            esc(d.name),
            esc(", ".join(f"{m:g}x" for m in summary.get("magnifications", [])) or "–"),
            esc(" + ".join(t.upper() for t in summary.get("terms", [])) or "–"),
            esc(f"{steps_done} / {summary.get('steps', '?')}"),
            badge("finished", "ok") if finished else badge("not finished", "warn"),
            esc(fmt(final.get("loss"))),
            esc(", ".join(f"{k} {v:.3f}" for k, v in final.items() if k not in ("loss", "loss_bl")) or "–"),
        ))
        if len(metrics):
            val = read_metrics(d, validation=True)
            png = loss_curves_png(metrics, ctx.image_path(f"loss_{safe_filename(d.name)}.png"), f"run {d.name}", val)
            if png is not None:
                caption = esc(SHOWN.pattern("run_metrics", run=d.name)) + (" (dashed: validation)" if val is not None else "")
                figs.append(f"<h3>{esc(d.name)}</h3>" + figure(ctx.rel(png), caption, width=1150))
        else:
            figs.append(f"<h3>{esc(d.name)}</h3>" + missing(f"<code>{esc(metrics_csv)}</code> has no rows yet."))
    body = table(["run", "magnifications", "loss terms", "steps", "state", "final loss", "final terms"], rows, raw=True)
    return section(anchor, title, body + "".join(figs),
                   lead="One row per run: which magnifications it saw and which loss terms were on (the ablations). "
                        "Curves are the per-term means the trainer logs every <code>log_every</code> steps.")

