"""``mrplip`` verbs of the PathFLIP stages: ``slide-captions``, ``subcaptions``; and
``planted-cohort``, the synthetic cohort with known regions that PathFLIP's localisation is
measured on."""

from __future__ import annotations

import argparse
import sys

from mrplip_core.jobs import write_shard_marker


def _settings(a: argparse.Namespace):  # -> PathflipSettings
    from mrplip_core.jobs import read_sections
    from mrplip_core.pathflip.plan import SECTIONS
    from mrplip_core.pathflip.settings import PathflipSettings

    return PathflipSettings.from_dict(read_sections(a.settings, *SECTIONS, verb=a.verb)["pathflip"])


def _cmd_slide_captions(a: argparse.Namespace) -> int:
    from mrplip_core.io.atomic import write_parquet
    from mrplip_core.layout import Layout
    from mrplip_core.pathflip.captions import CaptionFileError, read_caption_file, slide_captions
    from mrplip_core.wsi.table import read_slide_table

    settings = _settings(a)
    try:
        given = read_caption_file(settings.captions) if settings.captions else None
    except CaptionFileError as exc:
        print(f"mrplip slide-captions: {exc}", file=sys.stderr)
        return 2
    df = slide_captions(read_slide_table(a.table), given, settings.max_caption_chars)
    out = Layout(a.results).slide_captions
    write_parquet(df, out)
    counts = df["status"].value_counts().to_dict()
    print(f"{len(df)} rows -> {out}: {counts}")
    for sid, status, reason in zip(df["slide_id"], df["status"], df["reason"]):
        if status != "ok":
            print(f"  {sid}: {status}: {reason}", file=sys.stderr)
    return 0


def _cmd_subcaptions(a: argparse.Namespace) -> int:
    import pandas as pd

    from mrplip_core.io.atomic import write_parquet
    from mrplip_core.layout import Layout
    from mrplip_core.pathflip.subcaptions import subcaption_table

    s = _settings(a).subcaptions
    layout = Layout(a.results)
    table = pd.read_parquet(layout.slide_captions).set_index("slide_id")
    unknown = [sid for sid in a.slide_ids if sid not in table.index]
    if unknown:
        print(f"mrplip subcaptions: slide(s) {unknown} are not in {layout.slide_captions}", file=sys.stderr)
        return 2
    captions: dict[str, str] = {}
    tables: dict[str, pd.DataFrame] = {}
    for sid in a.slide_ids:
        caption = table.at[sid, "caption"] if table.at[sid, "status"] == "ok" else None
        if isinstance(caption, str) and s.method == "llm":
            captions[sid] = caption
        else:
            tables[sid] = subcaption_table(sid, caption if isinstance(caption, str) else None,
                                           split_clauses=s.split_clauses, min_words=s.min_words)
    failed = ""
    if captions:
        failed = _llm_split(s, captions, tables, a.log_dir)
    for sid in a.slide_ids:
        if sid not in tables:
            continue
        df = tables[sid]
        write_parquet(df, layout.subcaptions(sid))
        if df.empty:
            print(f"{sid}: none ({table.at[sid, 'status']})")
        else:
            method = df["method"].iloc[0]
            reason = f": {df['fallback_reason'].iloc[0]}" if method == "rules-fallback" else ""
            print(f"{sid}: {len(df)} sub-captions ({method}{reason})")
    if failed:
        print(f"mrplip subcaptions: {failed}", file=sys.stderr)
        return 1
    if a.done:  # a shard job (slides_per_job > 1): its marker, once every slide is done
        write_shard_marker(a.done, "subcaptions", a.slide_ids)
    return 0


def _llm_split(s, captions: dict[str, str], tables: dict, log_dir: str | None) -> str:  # s: SubcaptionSettings
    """Split ``captions`` with the language model into ``tables``; returns what failed ("" if nothing)."""
    import logging

    from mrplip_core.pathflip.llm_split import LLMRequestError, LLMSplitter
    from mrplip_core.serving.client import ServerGone
    from mrplip_core.serving.server import ServerError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with LLMSplitter(s, log_dir=log_dir) as splitter:
            tables.update(splitter.split(captions))
    except LLMRequestError as exc:
        tables.update(exc.tables)
        return f"no answer from the server for: {exc}"
    except (ServerGone, ServerError, OSError, ValueError) as exc:
        return f"slide(s) {sorted(captions)} not split: {type(exc).__name__}: {exc}"
    return ""


def _cmd_planted_cohort(a: argparse.Namespace) -> int:
    import time

    from mrplip_core.pathflip.planted import CohortFiles, write_planted_cohort
    from mrplip_core.wsi.planted import SCAN_MPP

    t0 = time.perf_counter()
    mpp = SCAN_MPP[a.palette] if a.mpp is None else a.mpp
    truth = write_planted_cohort(a.out, a.slides, a.seed, size_mm=a.size_mm, mpp=mpp, palette=a.palette)
    files = CohortFiles(a.out)
    kinds = truth.groupby("slide_id")["kind"].count()
    print(f"{len(kinds)} slides ({a.palette} palette, {a.size_mm} mm at {mpp} um/px), {len(truth)} kind sentences "
          f"({truth['kind'].value_counts().to_dict()}) -> {files.table}, {files.truth}, {files.config} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the PathFLIP verbs to the ``mrplip`` command's subparsers."""
    settings_help = "JSON of the config sections the stage uses: {\"pathflip\": {...}}"
    s = sub.add_parser("slide-captions", help="the slide captions table: a caption or the reason there is none, per slide")
    s.add_argument("--table", required=True, help="the slide table (TSV; its optional caption column)")
    s.add_argument("--results", default="results", help="the workflow's results folder")
    s.add_argument("--settings", default="", help=settings_help)
    s.set_defaults(func=_cmd_slide_captions)

    s = sub.add_parser("subcaptions", help="split slides' captions into region-level sub-captions")
    s.add_argument("slide_ids", nargs="+", metavar="SLIDE_ID")
    s.add_argument("--results", default="results", help="the workflow's results folder")
    s.add_argument("--settings", default="", help=settings_help)
    s.add_argument("--log-dir", default=None, help="folder for the vLLM server log (method llm, managed server)")
    s.add_argument("--done", default=None, help="write this shard marker once every slide is done (rules)")
    s.set_defaults(func=_cmd_subcaptions)

    s = sub.add_parser("planted-cohort", help="write a synthetic cohort whose captions' regions are known "
                                              "(slides, slide table, region GeoJSON, truth table, config)")
    s.add_argument("--out", required=True, help="folder to write (a workflow working directory)")
    s.add_argument("--slides", type=int, required=True, help="number of slides")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size-mm", type=float, default=4.1, help="side of each square slide, mm (4.1: 4 x 4 parent "
                                                               "boxes of 1.024 mm)")
    s.add_argument("--mpp", type=float, default=None,
                   help="um/px at level 0 (default: the palette's, wsi.planted.SCAN_MPP: 0.5 = 20x for tissue, "
                        "0.25 = 40x for architecture)")
    s.add_argument("--palette", choices=("architecture", "tissue"), default="tissue",  # wsi.planted.PALETTES
                   help="tissue: five kinds that differ at every magnification; architecture: glands or solid "
                        "sheets (5x) crossed with low- or high-grade nuclei (20-40x)")
    s.set_defaults(func=_cmd_planted_cohort)
