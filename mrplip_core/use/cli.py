"""``mrplip`` verbs for using trained models; :func:`register` adds them to the main parser.

    mrplip localize --model RUN_DIR_OR_NAME --slide ID [--slide ID ...] --text "..." [--text ...]
                    [--results results] [--out DIR] [--top-fraction 0.1] [--keep-going]
    mrplip embed --model RUN_DIR_OR_NAME --out FILE.h5 [--tiles FOLDER_OR_CSV --mpp X]
                 [--slides ID ...] [--prompts FILE] [--results results] [--keep-going]

Exit status: 0 when everything was done; 2 on a bad argument (an unknown model, an empty
query, no input) or when an input failed (named on stderr, recorded in the summary or the
HDF5 ``/failed`` group; the rest is done and written). ``--keep-going`` (the workflow's rule,
unless ``failures_fatal``) exits 0 when inputs failed but were recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mrplip_core.layout import RESULTS


def _fail(verb: str, message: str) -> int:
    print(f"mrplip {verb}: {message}", file=sys.stderr)
    return 2


def _settings(text: str) -> dict[str, Any]:
    return json.loads(text) if text else {}


def _cmd_localize(a: argparse.Namespace) -> int:
    import torch

    from mrplip_core.use.localize import localize_slides, summary_path
    from mrplip_core.use.models import ModelError, check_queries, load_model
    from mrplip_core.use.settings import LocalizeSettings

    torch.set_num_threads(max(1, a.threads))
    try:
        check_queries(a.text or [])
        settings = LocalizeSettings.from_dict({**_settings(a.settings).get("localize", {}),
                                               **({"top_fraction": a.top_fraction} if a.top_fraction else {}),
                                               **({"device": a.device} if a.device else {})})
        model = load_model(a.model, a.results, device=settings.device)
    except (ModelError, ValueError, FileNotFoundError) as exc:
        return _fail("localize", str(exc))
    summary = a.summary or summary_path(model.label, a.results, a.out)
    df = localize_slides(model, a.slide, a.text, settings, a.results, a.out, summary)
    for row in df[df["status"] == "ok"].drop_duplicates("slide_id").itertuples():
        print(f"{row.slide_id}: {len(a.text)} quer{'y' if len(a.text) == 1 else 'ies'} over {row.n_patches} patches "
              f"({model.label}; {row.background}) -> {row.scores.rsplit('/', 1)[0]}/")
    failed = df[df["status"] == "failed"].drop_duplicates("slide_id")
    for row in failed.itertuples():
        print(f"mrplip localize: {row.slide_id}: FAILED, recorded in {summary}: {row.error}", file=sys.stderr)
    return 2 if len(failed) and not a.keep_going else 0


def _cmd_embed(a: argparse.Namespace) -> int:
    import torch

    from mrplip_core.use.embed import (
        EmbedInputError,
        Embeddings,
        embed_slides,
        embed_texts,
        embed_tiles,
        read_prompts,
        read_tile_list,
        tile_embedder,
        write_embeddings,
    )
    from mrplip_core.use.models import ModelError, load_model

    torch.set_num_threads(max(1, a.threads))
    if not (a.tiles or a.slides or a.prompts):
        return _fail("embed", "nothing to embed: give --tiles, --slides and/or --prompts")
    settings = _settings(a.settings)
    asked = {"tiles": a.tiles, "mpp": a.mpp, "slides": a.slides, "prompts": a.prompts, "results": str(a.results),
             **settings}
    out = Embeddings()
    try:
        model = load_model(a.model, a.results, device=a.device)
        tiles = read_tile_list(a.tiles, a.mpp) if a.tiles else None
        prompts = read_prompts(a.prompts) if a.prompts else None
        if tiles is not None:
            embed_tiles(tile_embedder(model, settings=settings, results=a.results), *tiles, out, source=a.tiles)
        if a.slides:
            embed_slides(model, a.slides, out, a.results)
        if prompts is not None:
            embed_texts(model, *prompts, out)
    except (ModelError, EmbedInputError, ValueError, FileNotFoundError) as exc:
        return _fail("embed", str(exc))
    if not out.groups:
        for kind, item, error in out.failed:
            print(f"mrplip embed: {kind} {item}: {error}", file=sys.stderr)
        return _fail("embed", f"nothing could be embedded; {a.out} not written")
    write_embeddings(out, a.out, model, asked)
    shapes = ", ".join(f"{name} {tuple(g['embeddings'].shape)}" for name, g in out.groups.items())
    print(f"{model.label}: {shapes} -> {a.out}")
    for kind, item, error in out.failed:
        print(f"mrplip embed: {kind} {item}: FAILED, recorded in {a.out} /failed: {error}", file=sys.stderr)
    return 2 if out.failed and not a.keep_going else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``localize`` and ``embed`` to the ``mrplip`` parser."""
    s = sub.add_parser("localize", help="where on a slide a text is: per-patch scores, heatmap PNG, QuPath GeoJSON")
    s.add_argument("--model", required=True, help="a PathFLIP or MR-PLIP run folder, or a run name under --results")
    s.add_argument("--slide", action="append", required=True, help="a slide id (repeat for several)")
    s.add_argument("--text", action="append", required=True, help="a text query (repeat for several)")
    s.add_argument("--results", default=RESULTS, help="the workflow's results folder (features, slide table)")
    s.add_argument("--out", default=None, help="write DIR/{slide}/{query}.* and DIR/summary.parquet "
                                               "(default: results/localize/{family}-{run}/)")
    s.add_argument("--summary", default=None, help="the summary table's path (default: beside the outputs)")
    s.add_argument("--top-fraction", type=float, default=None,
                   help="share of a slide's patches (highest scores) in the GeoJSON region (default 0.1)")
    s.add_argument("--settings", default="", help='JSON {"localize": {...}} (the workflow\'s section)')
    s.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: localize.device, cpu)")
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    s.add_argument("--keep-going", action="store_true", help="exit 0 when slides failed (they are recorded)")
    s.set_defaults(func=_cmd_localize)

    s = sub.add_parser("embed", help="tile, slide and text embeddings of a trained model into HDF5")
    s.add_argument("--model", required=True, help="a PathFLIP or MR-PLIP run folder, or a run name under --results")
    s.add_argument("--out", required=True, help="the HDF5 file to write")
    s.add_argument("--tiles", default=None, help="a folder of tile images or a CSV with path[,mpp] (MR-PLIP runs)")
    s.add_argument("--mpp", type=float, default=None, help="um/px of the tiles (when the CSV gives none)")
    s.add_argument("--slides", nargs="+", default=None, metavar="ID", help="slides of the pipeline (PathFLIP runs)")
    s.add_argument("--prompts", default=None, help="texts: one per line, or JSON (list, or key -> texts)")
    s.add_argument("--results", default=RESULTS, help="the workflow's results folder (features, slide table)")
    s.add_argument("--settings", default="", help='JSON {"features": {...}, "evaluation": {"embedding": {...}}}: the '
                                                  "frozen encoder's weights and how tiles run through it")
    s.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N, for the model")
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    s.add_argument("--keep-going", action="store_true", help="exit 0 when inputs failed (they are recorded)")
    s.set_defaults(func=_cmd_embed)
