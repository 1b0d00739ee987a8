"""``mrplip`` verbs of the features stage: ``features``, ``text-features``, ``encoders``.

Wired into the main parser by ``mrplip_core.cli.build_parser`` through :func:`register`.
Nothing heavy is imported until a verb runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from mrplip_core.jobs import write_shard_marker


def _plan(a: argparse.Namespace):  # -> FeaturesPlan
    """The features plan of the verb's ``--settings`` (sections ``features``, ``failures_fatal``)."""
    from mrplip_core.features.plan import SECTIONS, FeaturesPlan
    from mrplip_core.jobs import read_sections

    sections = read_sections(a.settings, *SECTIONS, verb=a.verb)
    features = dict(sections["features"] or {})
    if sections["failures_fatal"] is not None:
        features["failures_fatal"] = sections["failures_fatal"]
    if a.encoder:
        features["image_encoder" if a.verb == "features" else "text_encoder"] = a.encoder
    return FeaturesPlan.from_config({"features": features})



def _cmd_features(a: argparse.Namespace) -> int:
    import torch

    from mrplip_core import __version__
    from mrplip_core.features.image import extract_image_features
    from mrplip_core.features.shard import extract_image_shard
    from mrplip_core.layout import Layout

    plan = _plan(a)
    layout = Layout(a.results)
    torch.set_num_threads(max(1, a.threads))
    if len(a.slide_ids) > 1:  # a shard: one encoder, one DataLoader, finished slides kept as parts
        trigger = json.dumps({"features": plan.image_trigger(plan.image_encoder), "version": __version__})
        for s in extract_image_shard(a.slide_ids, layout, plan.settings, trigger=trigger, threads=a.threads):
            print(f"{s['slide_id']}: {s['status']}" + (f", {s['n_patches']} patches, {s.get('images_per_s')} img/s"
                                                      if s["status"] == "ok" else f" {s.get('error') or s.get('part', '')}"))
        if a.done:  # a shard job (slides_per_job > 1): its marker, once every slide is done
            write_shard_marker(a.done, "features", a.slide_ids)
        return 0
    sid = a.slide_ids[0]
    out = layout.image_features(plan.image_encoder, sid)
    s = extract_image_features(sid, layout.tiles(sid), layout.slide_record(sid), out, plan.settings, threads=a.threads)
    if s["status"] == "ok":
        print(f"{sid}: {s['n_patches']} patches, groups {s['groups']}, encoder {s['encoder']} "
              f"(weights {s['weights']}), {s['device']} {s['precision']}, {s['images_per_s']} img/s, "
              f"loader wait {s['loader_wait_s']} s of {s['elapsed_s']} s -> {out}")
    else:
        print(f"{sid}: {s['status'].upper()}, recorded in {out}: {s['error']}", file=sys.stderr)
    if a.done:  # a shard job (slides_per_job > 1): its marker, once every slide is done
        write_shard_marker(a.done, "features", a.slide_ids)
    return 0


def _cmd_text_features(a: argparse.Namespace) -> int:
    import torch

    from mrplip_core.encoders import get_spec
    from mrplip_core.encoders.text import load_text_encoder
    from mrplip_core.features.text import extract_text_features
    from mrplip_core.layout import Layout

    settings = _plan(a).settings
    layout = Layout(a.results)
    torch.set_num_threads(max(1, a.threads))
    spec = get_spec(settings.text_encoder)
    encoder = load_text_encoder(spec, settings.weights_for(spec.name, spec.weights_key),
                                allow_random_init=settings.allow_random_init)  # once for all the job's slides
    for sid in a.slide_ids:
        out = layout.text_features(settings.text_encoder, sid)
        s = extract_text_features(sid, layout.captions(sid), layout.keywords(sid), out, settings, encoder=encoder)
        print(f"{sid}: {s['n_keywords']} keywords ({s['n_distinct_keywords']} distinct), "
              f"{s['n_captions']} captions ({s['n_truncated_captions']} truncated), encoder {s['encoder']} -> {out}")
    if a.done:  # a shard job (slides_per_job > 1): its marker, once every slide is done
        write_shard_marker(a.done, "text_features", a.slide_ids)
    return 0


def _cmd_encoders(a: argparse.Namespace) -> int:
    from mrplip_core.encoders import get_spec, list_encoders

    for name in list_encoders(a.kind):
        s = get_spec(name)
        size = f"{s.input_px}px" if s.kind == "image" else f"{s.context_length} tok"
        print(f"{name:16s} {s.kind:5s} {s.family:9s} {s.architecture:24s} D={s.embed_dim:<5d} {size:8s} {s.licence}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the features-stage verbs to the ``mrplip`` sub-command parser ``sub``."""
    settings_help = "JSON of the config sections the stage uses: {\"features\": {...}, \"failures_fatal\": false}"
    s = sub.add_parser("features", help="image features of slides' patches into HDF5 (several slides: encoder "
                                        "loaded once, finished slides kept for a rerun)")
    s.add_argument("slide_ids", nargs="+", metavar="SLIDE_ID",
                   help="reads {results}/tiles/{slide}.parquet and slides/{slide}.json")
    s.add_argument("--results", default="results", help="the workflow's results folder")
    s.add_argument("--encoder", default=None, help="registry name (default: features.image_encoder)")
    s.add_argument("--settings", default="", help=settings_help)
    s.add_argument("--threads", type=int, default=1, help="cores of this job (default DataLoader workers)")
    s.add_argument("--done", default=None, help="write this shard marker once every slide is done (rules, slides_per_job > 1)")
    s.set_defaults(func=_cmd_features)

    s = sub.add_parser("text-features", help="keyword and caption features of slides into HDF5")
    s.add_argument("slide_ids", nargs="+", metavar="SLIDE_ID",
                   help="reads {results}/captions/{slide}.parquet and keywords/{slide}.parquet")
    s.add_argument("--results", default="results", help="the workflow's results folder")
    s.add_argument("--encoder", default=None, help="registry name (default: features.text_encoder)")
    s.add_argument("--settings", default="", help=settings_help)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--done", default=None, help="write this shard marker once every slide is done (rules, slides_per_job > 1)")
    s.set_defaults(func=_cmd_text_features)

    s = sub.add_parser("encoders", help="list the registered encoders")
    s.add_argument("--kind", choices=["image", "text"], default=None)
    s.set_defaults(func=_cmd_encoders)
