"""The ``mrplip`` command: one verb per stage step, called by the Snakemake rules.

Every verb is a thin layer over a library function and can be run by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mrplip_core.jobs import write_shard_marker

PATCH_ID_RE = re.compile(r"^(?P<slide>.+)_(?P<mag>[0-9.]+)x_x(?P<x>\d+)_y(?P<y>\d+)$")



def _cmd_demo_slide(a: argparse.Namespace) -> int:
    from mrplip_core.wsi.synthetic import write_synthetic_slide

    write_synthetic_slide(a.out, a.width, a.height, a.mpp, seed=a.seed)
    return 0


def _cmd_tiles(a: argparse.Namespace) -> int:
    from mrplip_core.jobs import read_sections
    from mrplip_core.layout import Layout
    from mrplip_core.wsi.plan import SECTIONS
    from mrplip_core.wsi.table import read_slide_table, table_mpp
    from mrplip_core.wsi.tiling import TilesOutputs, TilesSettings, tile_slide

    settings = TilesSettings.from_sections(read_sections(a.settings, *SECTIONS, verb="tiles"))
    table = read_slide_table(a.table)
    unknown = [s for s in a.slide_ids if s not in table.index]
    if unknown:
        print(f"mrplip tiles: slide(s) {unknown} are not in the slide table {a.table}", file=sys.stderr)
        return 2
    layout = Layout(a.results)
    for sid in a.slide_ids:
        outputs = TilesOutputs(layout.tiles(sid), layout.tissue_geojson(sid), layout.tissue_qc(sid),
                               layout.slide_record(sid))
        rec = tile_slide(sid, table.at[sid, "path"], outputs, settings, table_mpp=table_mpp(table, sid))
        if rec["status"] == "ok":
            print(f"{sid}: {rec['n_parents']} parents, {rec['n_patches']} patches, "
                  f"magnifications {rec['magnifications']}, skipped {rec['skipped_magnifications']} "
                  f"({rec['elapsed_s']} s)")
        elif rec["status"] == "no_parents":
            print(f"{sid}: NO PARENTS, recorded: {rec['reason']}", file=sys.stderr)
        else:
            print(f"{sid}: FAILED, recorded: {rec['error']}", file=sys.stderr)
    if a.done:  # a shard job (slides_per_job > 1): its marker, once every slide is done
        write_shard_marker(a.done, "tiles", a.slide_ids)
    return 0


def _cmd_slides_table(a: argparse.Namespace) -> int:
    from mrplip_core.layout import Layout
    from mrplip_core.wsi.records import collect_slide_records

    layout = Layout(a.results)
    df = collect_slide_records(a.table, layout.slide_records, layout.slides_table)
    failed = df[~df["status"].isin(["ok", "no_parents"])]
    empty = df[df["status"] == "no_parents"]
    print(f"{len(df)} slides, {len(failed)} failed, {len(empty)} without parents -> {layout.slides_table}")
    for sid, err in zip(failed["slide_id"], failed["error"]):
        print(f"  FAILED {sid}: {err}", file=sys.stderr)
    for sid, reason in zip(empty["slide_id"], empty["reason"]):
        print(f"  NO PARENTS {sid}: {reason}", file=sys.stderr)
    return 1 if (a.fatal and len(failed)) else 0  # no_parents is not a failure of the slide: never fatal


def _cmd_inspect(a: argparse.Namespace) -> int:
    from mrplip_core.io.inspect import describe

    try:
        print(describe(a.path, a.rows, full=a.full))
    except (FileNotFoundError, ValueError) as exc:
        print(f"mrplip inspect: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_tile(a: argparse.Namespace) -> int:
    from mrplip_core.layout import Layout
    from mrplip_core.wsi.records import read_patch_image

    m = PATCH_ID_RE.match(a.patch_id)
    if not m:
        print(f"mrplip tile: {a.patch_id!r} is not a patch id (SLIDE_<mag>x_x<X>_y<Y>)", file=sys.stderr)
        return 2
    out = Path(a.out or f"{a.patch_id}.png")
    try:
        img = read_patch_image(Layout(a.results), m["slide"], a.patch_id)
    except (FileNotFoundError, KeyError) as exc:
        print(f"mrplip tile: {exc}", file=sys.stderr)
        return 2
    from PIL import Image

    Image.fromarray(img).save(out)
    print(f"{a.patch_id} -> {out} ({img.shape[1]}x{img.shape[0]} px)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mrplip_core.layout import Layout

    p = argparse.ArgumentParser(prog="mrplip", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("demo-slide", help="write a synthetic pyramidal TIFF slide (no network)")
    s.add_argument("out")
    s.add_argument("--width", type=int, default=16384, help="level-0 px")
    s.add_argument("--height", type=int, default=12288, help="level-0 px")
    s.add_argument("--mpp", type=float, default=0.25, help="um/px at level 0 (0.25 = 40x)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo_slide)

    s = sub.add_parser("tiles", help="tissue detection + hierarchical tiling of slides of the slide table")
    s.add_argument("slide_ids", nargs="+", metavar="SLIDE_ID")
    s.add_argument("--table", required=True, help="the slide table (TSV): each slide's path and mpp override")
    s.add_argument("--results", default="results", help="the workflow's results folder (writes tiles/, tissue/, slides/)")
    s.add_argument("--settings", default="", help="JSON of the config sections wsi, mpp_fallback, failures_fatal, "
                                                   "tissue, tiling (keyed by section name)")
    s.add_argument("--done", default=None, help="write this shard marker once every slide is done (rules, slides_per_job > 1)")
    s.set_defaults(func=_cmd_tiles)

    s = sub.add_parser("slides-table", help=f"collect the per-slide records into {Layout().slides_table}")
    s.add_argument("--table", required=True, help="the slide table (TSV)")
    s.add_argument("--results", default="results", help="the workflow's results folder")
    s.add_argument("--fatal", action="store_true", help="exit 1 when any slide failed")
    s.set_defaults(func=_cmd_slides_table)

    s = sub.add_parser("inspect", help="summarise a Parquet or HDF5 artifact")
    s.add_argument("path")
    s.add_argument("--rows", type=int, default=5, help="sample rows to show")
    s.add_argument("--full", action="store_true",
                   help="sample rows one field per line with whole values (default: a table as wide as the terminal)")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("tile", help="write one patch's image to a PNG")
    s.add_argument("patch_id")
    s.add_argument("--results", default="results", help="the workflow's results folder")
    s.add_argument("-o", "--out", default=None, help="PNG path (default PATCH_ID.png)")
    s.set_defaults(func=_cmd_tile)

    # later stages register their own verbs (their modules import heavy libraries lazily)
    from mrplip_core.captions import cli as captions_cli
    from mrplip_core.convert_llava import cli as convert_llava_cli
    from mrplip_core.evaluation import cli as evaluation_cli
    from mrplip_core.features import cli as features_cli
    from mrplip_core.pathflip import cli as pathflip_cli
    from mrplip_core.report import cli as report_cli
    from mrplip_core.train import cli as train_cli
    from mrplip_core.use import cli as use_cli

    for stage in (captions_cli, convert_llava_cli, features_cli, pathflip_cli, train_cli, evaluation_cli, use_cli, report_cli):
        stage.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
