"""``mrplip`` verbs of the features stage: ``features``, ``text-features``, ``encoders``.

Wired into the main parser by ``mrplip_core.cli.build_parser`` through :func:`register`.
Nothing heavy is imported until a verb runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace


def _settings(a: argparse.Namespace):  # -> FeatureSettings
    from mrplip_core.features.settings import FeatureSettings

    settings = json.loads(a.settings) if a.settings else {}
    features = dict(settings.get("features", settings))
    if "failures_fatal" in settings and "features" in settings:
        features["failures_fatal"] = settings["failures_fatal"]
    return FeatureSettings.from_dict(features)


def _cmd_features(a: argparse.Namespace) -> int:
    import torch

    from mrplip_core.features.image import extract_image_features

    settings = _settings(a)
    if a.encoder:
        settings = replace(settings, image_encoder=a.encoder)
    torch.set_num_threads(max(1, a.threads))
    s = extract_image_features(a.slide_id, a.manifest, a.record, a.out, settings, threads=a.threads)
    if s["status"] == "ok":
        print(f"{a.slide_id}: {s['n_patches']} patches, groups {s['groups']}, encoder {s['encoder']} "
              f"(weights {s['weights']}), {s['device']} {s['precision']}, {s['images_per_s']} img/s, "
              f"loader wait {s['loader_wait_s']} s of {s['elapsed_s']} s -> {a.out}")
    else:
        print(f"{a.slide_id}: {s['status'].upper()}, recorded in {a.out}: {s['error']}", file=sys.stderr)
    return 0


def _cmd_features_shard(a: argparse.Namespace) -> int:
    import torch

    from mrplip_core.features.shard import extract_image_shard

    settings = _settings(a)
    if a.encoder:
        settings = replace(settings, image_encoder=a.encoder)
    torch.set_num_threads(max(1, a.threads))
    for s in extract_image_shard(a.slides, a.results, settings, trigger=a.trigger, threads=a.threads):
        print(f"{s['slide_id']}: {s['status']}" + (f", {s['n_patches']} patches, {s.get('images_per_s')} img/s"
                                                  if s["status"] == "ok" else f" {s.get('error') or s.get('part', '')}"))
    return 0


def _cmd_text_features(a: argparse.Namespace) -> int:
    import torch

    from mrplip_core.features.text import extract_text_features

    settings = _settings(a)
    if a.encoder:
        settings = replace(settings, text_encoder=a.encoder)
    torch.set_num_threads(max(1, a.threads))
    s = extract_text_features(a.slide_id, a.captions, a.keywords, a.out, settings)
    print(f"{a.slide_id}: {s['n_keywords']} keywords ({s['n_distinct_keywords']} distinct), "
          f"{s['n_captions']} captions ({s['n_truncated_captions']} truncated), encoder {s['encoder']} -> {a.out}")
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
    s = sub.add_parser("features", help="image features of one slide's patches into HDF5")
    s.add_argument("--slide-id", required=True)
    s.add_argument("--manifest", required=True, help="results/tiles/{slide}.parquet")
    s.add_argument("--record", required=True, help="results/slides/{slide}.json")
    s.add_argument("--out", required=True, help="results/features/{encoder}/{slide}.h5")
    s.add_argument("--encoder", default=None, help="registry name (default: features.image_encoder)")
    s.add_argument("--settings", default="", help="JSON of the config's features section "
                   "(or {features: ..., failures_fatal: ...})")
    s.add_argument("--threads", type=int, default=1, help="cores of this job (default DataLoader workers)")
    s.set_defaults(func=_cmd_features)

    s = sub.add_parser("features-shard", help="image features of several slides, the encoder loaded once")
    s.add_argument("slides", nargs="+", help="slide ids (results/tiles/{slide}.parquet, results/slides/{slide}.json)")
    s.add_argument("--results", default="results")
    s.add_argument("--encoder", default=None, help="registry name (default: features.image_encoder)")
    s.add_argument("--trigger", required=True,
                   help="what changes a feature (the rule's rerun trigger): finished slides of a killed run "
                        "are reused only under the same trigger")
    s.add_argument("--settings", default="", help="JSON of the config's features section "
                   "(or {features: ..., failures_fatal: ...})")
    s.add_argument("--threads", type=int, default=1, help="cores of this job (default DataLoader workers)")
    s.set_defaults(func=_cmd_features_shard)

    s = sub.add_parser("text-features", help="keyword and caption features of one slide into HDF5")
    s.add_argument("--slide-id", required=True)
    s.add_argument("--captions", required=True, help="results/captions/{slide}.parquet")
    s.add_argument("--keywords", required=True, help="results/keywords/{slide}.parquet")
    s.add_argument("--out", required=True, help="results/text_features/{encoder}/{slide}.h5")
    s.add_argument("--encoder", default=None, help="registry name (default: features.text_encoder)")
    s.add_argument("--settings", default="", help="JSON of the config's features section")
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=_cmd_text_features)

    s = sub.add_parser("encoders", help="list the registered encoders")
    s.add_argument("--kind", choices=["image", "text"], default=None)
    s.set_defaults(func=_cmd_encoders)
