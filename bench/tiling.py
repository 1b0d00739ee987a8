"""Benchmark the tiles stage: seconds per slide, patches read per second, peak RSS.

Each slide is processed in a fresh subprocess so its peak RSS (ru_maxrss) is its own.
Slides: synthetic 40x pyramids of growing size (up to 40,960 x 40,960 px), a single-level
12,000 x 12,000 slide (no pyramid: the thumbnail is built in chunks), and the real slides
of ../shared/data when present.

    .venv/bin/python bench/tiling.py [--cache DIR] [--sizes 16384 40960] [--reads 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "slides"

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from mrplip_core.wsi.slide import Slide
from mrplip_core.wsi.tiling import TilesOutputs, TilesSettings, tile_slide
path, sid, mpp, out, n_reads = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])
mpp = float(mpp) if mpp != "-" else None
outs = TilesOutputs(out / "m.parquet", out / "t.geojson", out / "t.png", out / "r.json")
t0 = time.perf_counter()
rec = tile_slide(sid, path, outs, TilesSettings(), table_mpp=mpp)
t_tile = time.perf_counter() - t0
rss_tile = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
reads = {}
if rec["status"] == "ok":
    import pandas as pd
    df = pd.read_parquet(outs.manifest)
    with Slide(path, sid, mpp=mpp) as s:
        for mag, g in df.groupby("magnification"):
            g = g.head(n_reads)
            t0 = time.perf_counter()
            for r in g.itertuples():
                s.read_region(r.x, r.y, r.size, r.patch_px, level=r.read_level)
            reads[f"{mag:g}x"] = round(len(g) / (time.perf_counter() - t0), 1)
print(json.dumps({"slide": sid, "status": rec["status"], "size": [rec.get("width"), rec.get("height")],
                  "levels": rec.get("levels"), "patches": rec.get("n_patches"), "tiles_s": round(t_tile, 3),
                  "rss_tiles_mib": round(rss_tile, 1), "patches_per_s": reads,
                  "rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def make_slides(cache: Path, sizes: list[int]) -> list[tuple[str, Path, str]]:
    from mrplip_core.wsi.synthetic import write_synthetic_slide

    cache.mkdir(parents=True, exist_ok=True)
    slides = []
    for n in sizes:
        p = cache / f"synthetic40x_{n}.tiff"
        if not p.exists():
            t0 = time.perf_counter()
            write_synthetic_slide(p, n, n, 0.25, seed=n)
            print(f"# wrote {p.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        slides.append((f"synthetic40x_{n}", p, "-"))
    p = cache / "single_level_12000.tiff"
    if not p.exists():
        write_synthetic_slide(p, 12000, 12000, 0.25, seed=12, min_level_px=10**9)
    slides.append(("single_level_12000", p, "-"))
    if SHARED.is_dir():
        slides += [
            ("CMU-1-Small-Region", SHARED / "CMU-1-Small-Region.svs", "-"),
            ("TCGA-CR-7395 (mpp 0.5 given)", SHARED / "TCGA-CR-7395-01A-01-TS1.svs", "0.5"),
        ]
    return slides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "mrplip-bench-slides"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384, 40960])
    ap.add_argument("--reads", type=int, default=64, help="patches read per magnification")
    ap.add_argument("--repeats", type=int, default=3, help="runs per slide; the median is reported")
    a = ap.parse_args()
    rows = []
    for sid, path, mpp in make_slides(Path(a.cache), a.sizes):
        runs = []
        for _ in range(a.repeats):
            with tempfile.TemporaryDirectory() as out:
                proc = subprocess.run([sys.executable, "-c", CHILD, str(path), sid.split()[0], mpp, out, str(a.reads)],
                                      capture_output=True, text=True, check=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        runs.sort(key=lambda r: r["tiles_s"])
        med = runs[len(runs) // 2]
        med["slide"] = sid
        rows.append(med)
        print(json.dumps(med))
    print()
    print(f"{'slide':34} {'level-0 px':>15} {'lv':>2} {'patches':>7} {'tiles s':>8} {'RSS MiB':>8}  patches/s by magnification")
    for r in rows:
        size = "x".join(str(v) for v in r["size"]) if r["size"][0] else "-"
        print(f"{r['slide']:34} {size:>15} {r['levels'] or '-':>2} {r['patches'] or 0:>7} {r['tiles_s']:>8.2f} "
              f"{r['rss_tiles_mib']:>8.0f}  {r['patches_per_s']}")


if __name__ == "__main__":
    main()
