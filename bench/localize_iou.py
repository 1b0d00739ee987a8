"""`mrplip localize` on the planted cohort: does each sub-caption's top region overlap its
planted region? Runs the real verb, reads its QuPath GeoJSON with shapely, and reports the IoU
of the region (the union of its patch squares, level-0 px) with the planted polygons of the
sub-caption's kind.

    .venv/bin/python bench/localize_iou.py --workdir /tmp/planted --run results/pathflip/bench1

``--workdir`` is a planted cohort that bench/pathflip.py prepared and trained (``--run`` is
relative to it, or absolute). Held-out slides only. The chance figure is the IoU of a region of
the same number of patches drawn uniformly among the slide's patches (mean of 20 draws).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from shapely.geometry import box, shape
from shapely.ops import unary_union

REPO = Path(__file__).resolve().parents[1]


def polygons(geojson: dict, kind: str | None = None):
    """Union of the features' geometries (of ``kind`` when given), level-0 px."""
    shapes = [shape(f["geometry"]) for f in geojson["features"]
              if kind is None or (f.get("properties") or {}).get("kind") == kind]
    return unary_union(shapes) if shapes else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--top-fraction", type=float, default=0.25, help="share of patches in the region")
    a = ap.parse_args()
    workdir = a.workdir.resolve()
    run = a.run if a.run.is_absolute() else workdir / a.run
    results = workdir / "results"
    index = pd.read_parquet(run / "slides.parquet")
    held = index[(index["status"] == "ok") & (index["split"] == "val")]["slide_id"].astype(str).tolist()
    table = pd.read_csv(workdir / "slides.tsv", sep="\t").set_index("slide_id")
    truth = pd.read_parquet(workdir / "truth.parquet").set_index("subcaption_id")
    out = workdir / "localize_iou"
    rng = np.random.default_rng(0)
    rows = []
    for slide in held:
        subs = pd.read_parquet(results / "subcaptions" / f"{slide}.parquet")
        texts = subs["text"].astype(str).tolist()
        cmd = [sys.executable, "-m", "mrplip_core", "localize", "--model", str(run), "--results", str(results),
               "--out", str(out), "--slide", slide, "--top-fraction", str(a.top_fraction)]
        for t in texts:
            cmd += ["--text", t]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
        summary = pd.read_parquet(out / "summary.parquet")
        planted = json.loads((workdir / table.loc[slide, "regions"]).read_text())
        for sub_id, text in zip(subs["subcaption_id"].astype(str), texts):
            row = summary[(summary["slide_id"] == slide) & (summary["query"] == text)].iloc[-1]
            found = json.loads(Path(row["geojson"]).read_text())
            region = polygons(found)
            target = polygons(planted, truth.loc[sub_id, "kind"])
            iou = region.intersection(target).area / region.union(target).area
            scores = pd.read_parquet(row["scores"])
            squares = [box(r.x, r.y, r.x + r.w, r.y + r.h) for r in scores.itertuples(index=False)]
            n = int(scores["in_region"].sum())
            chance = np.mean([(lambda u: u.intersection(target).area / u.union(target).area)(
                unary_union([squares[i] for i in rng.choice(len(squares), n, replace=False)])) for _ in range(20)])
            rows.append({"slide": slide, "kind": truth.loc[sub_id, "kind"], "iou": iou, "chance": chance,
                         "valid": bool(region.is_valid)})
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{len(df)} sub-captions on {len(held)} held-out slides: mean IoU {df['iou'].mean():.3f} "
          f"(median {df['iou'].median():.3f}), chance {df['chance'].mean():.3f}; every GeoJSON geometry valid: "
          f"{bool(df['valid'].all())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
