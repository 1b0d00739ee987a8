"""``mrplip`` verbs of the captioning stage; :func:`register` adds them to the main parser."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _cmd_captions(a: argparse.Namespace) -> int:
    from mrplip_core.captions.run import SlideJob, caption_slides
    from mrplip_core.captions.settings import CaptionSettings

    _logging()
    settings = CaptionSettings.from_dict(json.loads(a.settings) if a.settings else {})
    jobs = [SlideJob.under(a.results, sid) for sid in a.slide_ids]
    summary = caption_slides(jobs, settings, log_dir=a.log_dir)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_keywords(a: argparse.Namespace) -> int:
    from mrplip_core.captions.keywords import keywords_for_slide
    from mrplip_core.captions.settings import CaptionSettings

    settings = CaptionSettings.from_dict(json.loads(a.settings) if a.settings else {})
    df = keywords_for_slide(a.captions, a.manifest, a.out, settings.keywords)
    print(f"{df['bag_id'].nunique()} bags, {len(df)} (bag, keyword) rows -> {a.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``captions`` and ``keywords``."""
    s = sub.add_parser("captions", help="caption the patches of one slide or a shard of slides (resumable)")
    s.add_argument("slide_ids", nargs="+", metavar="SLIDE_ID")
    s.add_argument("--results", default="results", help="results folder (reads tiles/, slides/; writes captions/)")
    s.add_argument("--settings", default=None, help="JSON of the config's captions section")
    s.add_argument("--log-dir", default=None, help="folder for the vLLM server log (managed server)")
    s.set_defaults(func=_cmd_captions)

    s = sub.add_parser("keywords", help="textual bags: keywords of each bag's captions")
    s.add_argument("--captions", required=True, help="results/captions/{slide}.parquet")
    s.add_argument("--manifest", required=True, help="results/tiles/{slide}.parquet")
    s.add_argument("--out", required=True, help="results/keywords/{slide}.parquet")
    s.add_argument("--settings", default=None, help="JSON of the config's captions section")
    s.set_defaults(func=_cmd_keywords)
