"""Report sections about the evaluation: the comparison tables (baselines, runs, ablations),
per-dataset details with confusion matrices, retrieval, and the paper's published figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from mrplip_core.evaluation.plots import CONFUSION_DPI
from mrplip_core.evaluation.plan import SLIDES
from mrplip_core.evaluation.run import collect_metrics
from mrplip_core.evaluation.settings import BASELINE_PREFIX
from mrplip_core.report.context import ReportContext
from mrplip_core.report.html import esc, figure, fmt, kv_table, missing, note, section, table
from mrplip_core.layout import RETRIEVAL, Layout
from mrplip_core.train.summary import read_run_config, run_summary

#: Where a run's retrieval result is, as the page shows it (the layout's pattern).
_RETRIEVAL_SHOWN = Layout().pattern("eval_metrics", model="{run}", dataset=RETRIEVAL)

#: Zero-shot weighted F1 published in the MR-PLIP paper (arXiv 2504.18856), for context only.
PUBLISHED_ZERO_SHOT = {
    "columns": ["NCT-CRC", "PCam", "LC25000 (lung)", "DigestPath", "MHIST"],
    "rows": [("MR-PLIP (paper)", [0.871, 0.635, 0.853, 0.935, 0.643]),
             ("CONCH (as reported there)", [0.803, 0.578, 0.805, 0.906, 0.546])],
}


class Footnotes:
    """Numbered reasons for n/a cells, printed once under a table."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def mark(self, reason: str) -> str:
        if reason not in self.items:
            self.items.append(reason)
        return f'<span class="na">n/a<sup>{self.items.index(reason) + 1}</sup></span>'

    def html(self) -> str:
        if not self.items:
            return ""
        lis = "".join(f"<li>{esc(r)}</li>" for r in self.items)
        return f'<ol class="note" style="padding-left:28px">{lis}</ol>'


def model_order(metrics: list[dict[str, Any]], runs: Sequence[str] | None = None,
                baselines: Sequence[str] | None = None) -> list[str]:
    """Baselines first, then the runs in the given order (only those, when given: results of
    models no longer configured stay on disk but not in the page), else every other model."""
    models = {m["model"] for m in metrics}
    if baselines is not None:
        base = [BASELINE_PREFIX + b for b in baselines if BASELINE_PREFIX + b in models]
    else:
        base = sorted(m for m in models if m.startswith(BASELINE_PREFIX))
    rest = [r for r in runs if r in models] if runs is not None else sorted(models - set(base))
    return base + rest


def describe_model(info: dict[str, Any]) -> str:
    """One line saying what a model is (the ablation axes for pretrain runs)."""
    kind = info.get("kind")
    if kind == "frozen-encoder":
        return f"frozen {info.get('image_encoder')} features, no pretraining (baseline)"
    if kind == "mrplip":
        mags = "/".join(f"{m:g}" for m in info.get("magnifications", [])) + "x"
        res = "multi-resolution" if info.get("multi_resolution") else "single resolution"
        cvta = f"CVTA ({info['cvta_denominator']})" if info.get("cvta_denominator") else (
            f"CVTA {'on' if info.get('cvta') else 'off'}")
        mrtva = f"MRTVA ({info['mrtva_pairs']} pairs)" if info.get("mrtva_pairs") else (
            f"MRTVA {'on' if info.get('mrtva') else 'off'}")
        parts = [f"MR-PLIP on {info.get('image_encoder')}", f"{res} ({mags})", cvta, mrtva]
        if info.get("steps"):
            parts.append(f"{info['steps']} steps")
        return " · ".join(parts)
    return str(info.get("note") or kind or "")


def _cell(result: dict[str, Any] | None, key: str, notes: Footnotes) -> tuple[str, float | None]:
    if result is None:
        return notes.mark("not evaluated (no metrics.json)"), None
    if result.get("status") != "ok":
        return notes.mark(result.get("reason", result.get("status", ""))), None
    v = float(result[key])
    return fmt(v), v


def _bold_best(rows: list[list[str]], values: list[list[float | None]], offset: int = 2) -> None:
    """Bold the highest value of each column (ties: all of them); ``values[i][j]`` is the
    number shown in ``rows[i][j + offset]`` (None: not a number)."""
    if not rows:
        return
    for j in range(len(values[0])):
        col = [v[j] for v in values if v[j] is not None]
        if len(col) < 2:
            continue
        best = max(col)
        for i, v in enumerate(values):
            if v[j] is not None and abs(v[j] - best) < 1e-12:
                rows[i][j + offset] = f'<span class="best">{rows[i][j + offset]}</span>'


def evaluation(ctx: ReportContext) -> str:
    """Comparison tables, the pretraining effect, per-dataset details, retrieval."""
    title, anchor = "Evaluation", "evaluation"
    metrics = collect_metrics(ctx.eval_dir)
    if not metrics:
        return section(anchor, title, missing(f"No results in <code>{esc(ctx.eval_dir)}</code> yet: run "
                                              "<code>snakemake evaluate</code> (needs evaluation.datasets in the config)."))
    order = {s.name: i for i, s in enumerate(ctx.datasets)}
    tile = [m for m in metrics if m.get("dataset") not in (RETRIEVAL, SLIDES) and (not order or m.get("dataset") in order)]
    datasets = sorted({m["dataset"] for m in tile}, key=lambda d: (order.get(d, 99), d))
    models = model_order(metrics, ctx.runs, ctx.baselines)
    by = {(m["model"], m["dataset"]): m for m in metrics}
    info = {m["model"]: m.get("embedder", {}) for m in metrics if m.get("embedder")}
    for m in models:  # a run's own folder says best what it trained (the ablation axes)
        if not m.startswith(BASELINE_PREFIX) and ctx.layout.run_config(m).exists():
            run = read_run_config(ctx.layout.run_dir(m))
            info[m] = {"kind": "mrplip", "image_encoder": (run.get("data") or {}).get("image_encoder"), **run_summary(run)}

    evaluated = [d for d in datasets if any(by.get((m, d), {}).get("status") == "ok" for m in models)]
    body = []
    if evaluated:
        body += [_classification_table(models, evaluated, by, info), _effect_table(models, evaluated, by, info),
                 _few_shot_table(models, evaluated, by)]
    skipped = [d for d in datasets if d not in evaluated]
    if skipped:
        body.append(missing("Configured but not evaluated: " + ", ".join(f"<b>{esc(d)}</b>" for d in skipped)
                            + " (reasons below)."))
    body.append(_retrieval_table(models, by))
    for d in datasets:
        body.append(_dataset_details(ctx, d, models, by))
    return section(anchor, title, "".join(body),
                   lead="Baselines (the frozen encoder's own features, before pretraining) and every pretraining run, "
                        "on the same tiles with the same protocol. Weighted F1 is the paper's metric; balanced accuracy "
                        "is in the per-dataset details. Bold: best in its column.")


def _classification_table(models, datasets, by, info) -> str:
    notes = Footnotes()
    rows, values = [], []
    for m in models:
        row, vals = [esc(m), esc(describe_model(info.get(m, {})))], []
        for d in datasets:
            r = by.get((m, d))
            for task in ("zero_shot", "linear_probe"):
                res = r if r is None or r.get("status") != "ok" else r[task]
                text, v = _cell(res, "weighted_f1", notes)
                row.append(text)
                vals.append(v)
        rows.append(row)
        values.append(vals)
    _bold_best(rows, values)
    cols = ["model", "what it is"] + [f"{d}: {t}" for d in datasets for t in ("zero-shot wF1", "linear probe wF1")]
    return "<h3>Tile classification (weighted F1)</h3>" + table(cols, rows, raw=True, numeric=range(2, len(cols))) + notes.html()


def _effect_table(models, datasets, by, info) -> str:
    """Each run's linear-probe weighted F1 minus that of its own frozen encoder."""
    def probe(m: str, d: str) -> dict[str, Any]:
        r = by.get((m, d), {})
        return r.get("linear_probe", {}) if r.get("status") == "ok" else {}

    runs = [m for m in models if not m.startswith(BASELINE_PREFIX)]
    datasets = [d for d in datasets if any(probe(m, d).get("status") == "ok" for m in runs)]
    rows = []
    for m in models:
        enc = info.get(m, {}).get("image_encoder")
        if m.startswith(BASELINE_PREFIX) or not enc:
            continue
        base = BASELINE_PREFIX + enc
        row = [esc(m), esc(base)]
        for d in datasets:
            ra, rb = probe(m, d), probe(base, d)
            if ra.get("status") == "ok" and rb.get("status") == "ok":
                delta = ra["weighted_f1"] - rb["weighted_f1"]
                row.append(f"{delta:+.3f} <span class='na'>({fmt(rb['weighted_f1'])} → {fmt(ra['weighted_f1'])})</span>")
            else:
                row.append('<span class="na">–</span>')
        rows.append(row)
    if not rows or not datasets:
        return ""
    cols = ["run", "compared with"] + [f"{d}: Δ linear-probe wF1" for d in datasets]
    return ("<h3>Did pretraining help?</h3>"
            + table(cols, rows, raw=True, numeric=range(2, len(cols)))
            + note("Δ is the run's linear-probe weighted F1 minus that of the frozen encoder it was trained on, "
                   "with the same folds. Rows that differ only in one setting (magnifications, CVTA, MRTVA) answer "
                   "<i>which part</i> helped. On a few dozen tiles a difference of one tile is several points: "
                   "read the test counts in the details before concluding anything."))


def _few_shot_table(models, datasets, by) -> str:
    ks = sorted({int(k) for (_, d), r in by.items() if d in datasets and r.get("status") == "ok"
                 and r.get("few_shot", {}).get("status") == "ok" for k in r["few_shot"]["shots"]})
    if not ks:
        reasons = sorted({r.get("few_shot", {}).get("reason", "") for (_, d), r in by.items()
                          if d in datasets and r.get("status") == "ok"} - {""})
        return "<h3>k-shot linear probes</h3>" + note("Not computed: " + ("; ".join(reasons) if reasons else
                                                                          "no dataset result has k-shot probes") + ".")
    datasets = [d for d in datasets if any(by.get((m, d), {}).get("few_shot", {}).get("status") == "ok" for m in models)]
    cols = ["model", "seeds"] + [f"{d}: {k}-shot" for d in datasets for k in ks]
    rows = []
    for m in models:
        row, seeds = [esc(m)], set()
        cells = []
        for d in datasets:
            fs = by.get((m, d), {}).get("few_shot", {})
            for k in ks:
                s = fs.get("shots", {}).get(str(k)) if fs.get("status") == "ok" else None
                if s:
                    seeds.add(s["n_seeds"])
                    cells.append(f"{s['weighted_f1']['mean']:.3f} ± {s['weighted_f1']['std']:.3f}")
                else:
                    cells.append('<span class="na">–</span>')
        rows.append(row + [esc("/".join(map(str, sorted(seeds))) or "–")] + cells)
    return ("<h3>k-shot linear probes (weighted F1, mean ± sd over seeds)</h3>"
            + table(cols, rows, raw=True, numeric=range(1, len(cols)))
            + note("k training tiles per class drawn per seed; a dash means the class sizes do not allow that k."))


def _retrieval_table(models, by) -> str:
    results = [(m, by[(m, RETRIEVAL)]) for m in models if (m, RETRIEVAL) in by]
    if not results:
        return ("<h3>Cross-modal retrieval</h3>"
                + missing(f"No retrieval results yet (<code>{esc(_RETRIEVAL_SHOWN)}</code>); "
                          "they need a finished pretraining run and captions."))
    notes = Footnotes()
    ks: list[str] = []
    for _, r in results:
        if r.get("status") == "ok":
            ks = list(r["image_to_text"])
            break
    cols = ["model", "pairs", "slides"] + [f"{what} {k}" for what in ("image→text", "text→image", "chance") for k in ks]
    rows, values = [], []
    for m, r in results:
        if r.get("status") != "ok":
            rows.append([esc(m), notes.mark(r.get("reason", "")), ""] + [""] * (3 * len(ks)))
            values.append([None] * (3 * len(ks)))
            continue
        recalls = [r["image_to_text"][k] for k in ks] + [r["text_to_image"][k] for k in ks]
        rows.append([esc(m), str(r["n_pairs"]), esc(f"{len(r['slides'])} ({r['split']})")]
                    + [fmt(v) for v in recalls] + [fmt(r["chance"][k]) for k in ks])
        values.append(recalls + [None] * len(ks))
    _bold_best(rows, values, offset=3)
    split_notes = sorted({r.get("split_note", "") for _, r in results if r.get("status") == "ok"})
    return ("<h3>Cross-modal retrieval (recall@K on patch/caption pairs)</h3>"
            + table(cols, rows, raw=True, numeric=range(1, len(cols))) + notes.html()
            + "".join(note("Pairs: " + esc(s) + ". Patches whose captions are word-for-word identical all count as "
                           "correct.") for s in split_notes))


def _dataset_details(ctx: ReportContext, dataset: str, models: list[str], by: dict) -> str:
    results = [(m, by[(m, dataset)]) for m in models if (m, dataset) in by]
    ok = [(m, r) for m, r in results if r.get("status") == "ok"]
    head = f'<h3 id="ds-{esc(dataset)}">Dataset {esc(dataset)}</h3>'
    if not ok:
        reasons = "; ".join(sorted({str(r.get("reason", r.get("status"))) for _, r in results}))
        return head + missing(f"Not evaluated: {esc(reasons)}")
    first = ok[0][1]
    counts = ", ".join(f"{c} {n}" for c, n in first["class_counts"].items())
    facts = [("title", first.get("title") or dataset), ("tiles", f"{first['n_tiles']} ({counts})"),
             ("resolution", f"{first['mpp']:g} um/px, presented to the models as {first['magnification']:.3g}x "
                            "(MR-PLIP uses its nearest pretraining magnification)"),
             ("source", first.get("source", ""))]
    body = kv_table(facts)
    for task in ("zero_shot", "linear_probe"):
        notes_seen = sorted({r[task].get("protocol_note", "") for _, r in ok if r[task].get("status") == "ok"})
        for n in notes_seen:
            if n:
                body += note(f"<b>{task.replace('_', ' ')}</b>: {esc(n)}")
    if first.get("citation"):
        body += f'<p class="kw">Data: {esc(first["citation"])}</p>'
    # per-class F1 and balanced accuracy
    cols, columns = ["class", "tiles"], []
    for m, r in ok:
        for task in ("zero_shot", "linear_probe"):
            if r[task].get("status") == "ok":
                cols.append(f"{m}: {task.replace('_', ' ')} F1")
                columns.append(r[task])
    rows = []
    for i, c in enumerate(first["classes"]):
        rows.append([c, first["class_counts"][c]] + [col["per_class"][i]["f1"] for col in columns])
    rows.append(["balanced accuracy", ""] + [col["balanced_accuracy"] for col in columns])
    rows.append(["accuracy", ""] + [col["accuracy"] for col in columns])
    if columns:
        body += "<h4>Per class (F1)</h4>" + table(cols, rows, numeric=range(1, len(cols)))
    model_rows = []
    for m, r in ok:
        figs = []
        for task in ("zero_shot", "linear_probe"):
            png = r[task].get("confusion_png") if r[task].get("status") == "ok" else None
            if png:
                src_path = Path(r["_dir"]) / png
                src = ctx.copy_image(src_path, f"cm_{m}_{dataset}_{task}.png".replace("/", "_"))
                with Image.open(src_path) as im:
                    width = im.width * 100 // CONFUSION_DPI
                figs.append(figure(src, f"{esc(m)}: {task.replace('_', ' ')}", width=width))
        if figs:
            model_rows.append(f'<div class="grid" style="margin-bottom:12px">{"".join(figs)}</div>')
    if model_rows:
        body += "<h4>Confusion matrices (rows: true class; one row of figures per model)</h4>" + "".join(model_rows)
    return head + body


def published(ctx: ReportContext) -> str:
    cols = ["model"] + PUBLISHED_ZERO_SHOT["columns"]
    rows = [[name, *vals] for name, vals in PUBLISHED_ZERO_SHOT["rows"]]
    return section("published", "Published figures, for context", table(cols, rows, numeric=range(1, len(cols)))
                   + note("Zero-shot weighted F1 as published in the MR-PLIP paper (CVPR 2025, arXiv 2504.18856), on the "
                          "full test sets, with the authors' weights and pretraining data. Not comparable with the numbers "
                          "above unless those come from the same weights, data and test sets."))
