"""``mrplip`` verbs of the captioning stage; :func:`register` adds them to the main parser."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mrplip_core.jobs import write_shard_marker


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")



def _cmd_captions(a: argparse.Namespace) -> int:
    from mrplip_core.captions.run import SlideJob, caption_slides

    _logging()
    settings = _settings(a)
    jobs = [SlideJob.under(a.results, sid) for sid in a.slide_ids]
    summary = caption_slides(jobs, settings, log_dir=a.log_dir)
    print(json.dumps(summary, indent=1))
    if a.done:  # a shard job (slides_per_job > 1): its marker, once every slide is done
        write_shard_marker(a.done, "captions", a.slide_ids)
    return 0


def _settings(a: argparse.Namespace):  # -> CaptionSettings
    """The ``captions`` section of the verb's ``--settings`` (keyed by section name)."""
    from mrplip_core.captions.plan import SECTIONS
    from mrplip_core.captions.settings import CaptionSettings
    from mrplip_core.jobs import read_sections

    return CaptionSettings.from_dict(read_sections(a.settings, *SECTIONS, verb=a.verb)["captions"])


def _cmd_keywords(a: argparse.Namespace) -> int:
    from mrplip_core.captions.keywords import keywords_for_slide
    from mrplip_core.layout import Layout

    settings = _settings(a)
    layout = Layout(a.results)
    for sid in a.slide_ids:
        out = layout.keywords(sid)
        df = keywords_for_slide(layout.captions(sid), layout.tiles(sid), out, settings.keywords)
        print(f"{sid}: {df['bag_id'].nunique()} bags, {len(df)} (bag, keyword) rows -> {out}")
    if a.done:  # a shard job (slides_per_job > 1): its marker, once every slide is done
        write_shard_marker(a.done, "keywords", a.slide_ids)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``captions`` and ``keywords``."""
    s = sub.add_parser("captions", help="caption the patches of one slide or a shard of slides (resumable)")
    s.add_argument("slide_ids", nargs="+", metavar="SLIDE_ID")
    s.add_argument("--results", default="results", help="results folder (reads tiles/, slides/; writes captions/)")
    s.add_argument("--settings", default=None, help="JSON of the config sections the stage uses: {\"captions\": {...}}")
    s.add_argument("--log-dir", default=None, help="folder for the vLLM server log (managed server)")
    s.add_argument("--done", default=None, help="write this shard marker once every slide is done (rules, slides_per_job > 1)")
    s.set_defaults(func=_cmd_captions)

    s = sub.add_parser("keywords", help="textual bags: keywords of each bag's captions, for slides")
    s.add_argument("slide_ids", nargs="+", metavar="SLIDE_ID")
    s.add_argument("--results", default="results", help="results folder (reads captions/, tiles/; writes keywords/)")
    s.add_argument("--settings", default=None, help="JSON of the config sections the stage uses: {\"captions\": {...}}")
    s.add_argument("--done", default=None, help="write this shard marker once every slide is done (rules, slides_per_job > 1)")
    s.set_defaults(func=_cmd_keywords)
