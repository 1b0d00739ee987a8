"""Benchmark image feature extraction: images/s and where the time goes.

Phases, each measured alone on the same patches (one slide's tile manifest):
- read      PatchDataset.read at the manifest's patch_px, one process, in manifest order (CPU
            ms/patch: children cropped from their parents' reads where the pyramid allows, see
            mrplip_core.features.dataset), and each patch read alone per magnification (5x/10x
            patches come from coarser levels than 40x ones)
- resize    patch_px -> encoder input_px with cv2 (CPU ms/patch)
- loader    the DataLoader alone (W workers, each with its own OpenSlide handle): images/s,
            and CPU ms per image summed over workers (what it costs wherever it runs), for
            both read modes (manifest: the exact patch then resized; pyramid: read at input px)
- transfer  pinned uint8 batch -> device (GPU only): images/s
- model     normalise + forward on uint8 batches already on the device: images/s, the
            ceiling the whole pipeline can reach (and CPU ms per image on CPU)
- pipeline  encode_patches end to end (loader + transfer + model): images/s, the share of
            time the model loop waited on the loader, and images/s over the model's alone
            (pipeline_over_model: the GPU target is >= 0.8)
- shard     --slides slides through one DataLoader (how a features job runs a shard) and
            through one DataLoader per slide, images/s of each

CPU (default; tiny-vit-random, fp32):
    .venv/bin/python bench/features.py
GPU (when there is one; UNI with random weights, bf16 autocast):
    .venv/bin/python bench/features.py --encoder uni --device cuda --precision bf16 \
        --batch-size 256 --workers 14 --patches 4096

The slide is a synthetic 40x pyramid written to --cache (no download); --slide takes a
real one instead (e.g. ../shared/data/slides/CMU-1-Small-Region.svs). The manifest is the
tiles stage's with ``selection: all``; patches are cycled up to --patches, each copy with
its own ids (OpenSlide's tile cache, 32 MiB per handle, holds far less than a copy's pixels).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mrplip_core.encoders import load_image_encoder  # noqa: E402
from mrplip_core.encoders.catalog import DEFAULT_IMAGE_ENCODER  # noqa: E402
from mrplip_core.encoders.image import resize_patch  # noqa: E402
from mrplip_core.encoders.runtime import autocast, resolve_device, resolve_precision  # noqa: E402
from mrplip_core.features.dataset import PatchDataset, ShardPatches, patch_loader  # noqa: E402
from mrplip_core.features.image import encode_patches, encode_shard  # noqa: E402


def make_manifest(slide: Path | None, cache: Path, mpp: float | None) -> tuple[pd.DataFrame, dict]:
    from mrplip_core.wsi.synthetic import write_synthetic_slide
    from mrplip_core.wsi.tiling import TilesOutputs, TilesSettings, tile_slide

    cache.mkdir(parents=True, exist_ok=True)
    if slide is None:
        slide = cache / "synthetic_40x_16384.tiff"
        if not slide.exists():
            write_synthetic_slide(slide, 16384, 12288, 0.25, seed=1)
    out = Path(tempfile.mkdtemp(prefix="bench-features-", dir=cache))
    outs = TilesOutputs(out / "m.parquet", out / "t.geojson", out / "t.png", out / "r.json")
    settings = TilesSettings.from_dict({"tiling": {"selection": "all", "min_tissue_fraction": 0.25}})
    rec = tile_slide(slide.stem, slide, outs, settings, table_mpp=mpp)
    if rec["status"] != "ok" or not rec["n_patches"]:
        raise SystemExit(f"tiling {slide} gave no patches: {rec.get('error')}")
    return pd.read_parquet(outs.manifest), rec


def cycled(manifest: pd.DataFrame, n: int) -> pd.DataFrame:
    """The manifest repeated up to ``n`` rows, each copy with its own patch and bag ids (so a
    copy's children point at their own copy's parents, as in a real manifest)."""
    copies = []
    for c in range(-(-n // len(manifest))):
        m = manifest.copy()
        for col in ("patch_id", "parent_id", "bag_id"):
            m[col] = m[col].where(m[col].isna(), m[col].astype(str) + f"~{c}")
        copies.append(m)
    return pd.concat(copies, ignore_index=True).head(n)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, n: int) -> float:
    """CPU seconds of this process for ``fn(0) .. fn(n-1)``."""
    t0 = time.process_time()
    for i in range(n):
        fn(i)
    return time.process_time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", type=Path, default=None, help="a real slide (default: synthetic 40x in --cache)")
    p.add_argument("--mpp", type=float, default=None, help="um/px override for --slide")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mrplip-bench-features")
    p.add_argument("--encoder", default=DEFAULT_IMAGE_ENCODER)
    p.add_argument("--weights", default=None, help="local weights (default: random init, recorded)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch-size", type=int, default=256, help="the config's features.batch_size default")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument("--patches", type=int, default=512, help="patches per phase (manifest cycled)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--read", choices=["manifest", "pyramid"], default="manifest", help="read mode of the pipeline phase")
    p.add_argument("--slides", type=int, default=4, help="slides of the shard phase (copies of the manifest)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    manifest, rec = make_manifest(a.slide, a.cache, a.mpp)
    rows = cycled(manifest, a.patches)
    t0 = time.perf_counter()
    enc = load_image_encoder(a.encoder, a.weights)
    t_build = time.perf_counter() - t0
    device = resolve_device(a.device)
    precision = resolve_precision(a.precision, enc.spec, device)
    ds = PatchDataset(rec["path"], rec["slide_id"], rec["mpp"], rows, enc.input_px, a.read)
    n = len(ds)
    res: dict = {
        "slide": rec["path"], "slide_size": [rec["width"], rec["height"]], "manifest_patches": len(manifest),
        "patches": n, "patch_px": int(rows["patch_px"].iloc[0]), "encoder": a.encoder, "weights": enc.weights.source,
        "input_px": enc.input_px, "dim": enc.dim, "device": str(device), "precision": precision,
        "batch_size": a.batch_size, "workers": a.workers, "read": a.read, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2), "build_s": round(t_build, 2),
    }
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)

    # read and resize, one process (CPU seconds: robust to other load on the machine)
    k = min(n, 128)
    ds.read(0)
    patches = []
    t_read = timed(lambda i: patches.append(ds.read(i)), k)
    t_resize = timed(lambda i: resize_patch(patches[i], enc.input_px), k)
    res["read_ms_per_patch"] = round(1000 * t_read / k, 2)
    res["resize_ms_per_patch"] = round(1000 * t_resize / k, 2)
    whole = PatchDataset(rec["path"], rec["slide_id"], rec["mpp"], manifest, enc.input_px, cache_bytes=0)
    by_mag = {}
    for mag, rows_of_mag in manifest.groupby("magnification").indices.items():
        sample = rows_of_mag[:16]
        by_mag[f"{mag:g}x"] = round(1000 * timed(lambda i: whole.read(int(sample[i])), len(sample)) / len(sample), 2)
    res["read_ms_per_patch_by_magnification"] = by_mag
    whole.close()
    ds.close()

    # loader alone, both read modes; its CPU cost (workers + main) is what a machine with
    # free cores pays wherever it runs
    for mode in ("manifest", "pyramid"):
        mode_ds = ShardPatches([PatchDataset(rec["path"], rec["slide_id"], rec["mpp"], rows, enc.input_px, mode)])
        loader = patch_loader(mode_ds, num_workers=a.workers, pin_memory=device.type == "cuda")
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        for _ in loader:
            pass
        res[f"loader_{mode}_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
        res[f"loader_{mode}_cpu_ms_per_image"] = round(1000 * (cpu_seconds() - c0) / n, 2)

    # transfer and model alone, on batches already in memory / on the device
    module = enc.module.to(device).eval().to(memory_format=torch.channels_last)
    run = torch.compile(module, dynamic=False) if a.compile else module
    batch = torch.randint(0, 256, (a.batch_size, enc.input_px, enc.input_px, 3), dtype=torch.uint8)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        pinned = batch.pin_memory()
        times = []
        for _ in range(10):
            sync(); t0 = time.perf_counter(); pinned.to(device, non_blocking=True); sync()
            times.append(time.perf_counter() - t0)
        res["transfer_images_per_s"] = round(a.batch_size / statistics.median(times), 1)
    on_dev = batch.to(device)
    iters = max(2, n // a.batch_size)
    with torch.inference_mode():
        for _ in range(2):  # warm-up (and compile)
            with autocast(device, precision):
                run(enc.normalize(on_dev))
        sync(); t0 = time.perf_counter(); c0 = time.process_time()
        for _ in range(iters):
            with autocast(device, precision):
                run(enc.normalize(on_dev))
        sync()
    res["model_images_per_s"] = round(iters * a.batch_size / (time.perf_counter() - t0), 1)
    if device.type == "cpu":
        res["model_cpu_ms_per_image"] = round(1000 * (time.process_time() - c0) / (iters * a.batch_size), 2)
    if device.type == "cuda":
        res["gpu_peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    # whole pipeline
    feats, timings = encode_patches(ds, enc, device=device, precision=precision, batch_size=a.batch_size,
                                    num_workers=a.workers, channels_last=True, compile=a.compile)
    res["pipeline_images_per_s"] = timings["images_per_s"]
    res["pipeline_s"] = timings["elapsed_s"]
    res["pipeline_loader_wait_share"] = round(timings["loader_wait_s"] / max(timings["elapsed_s"], 1e-9), 3)
    res["pipeline_over_model"] = round(timings["images_per_s"] / res["model_images_per_s"], 3)
    assert feats.shape == (n, enc.dim) and np.isfinite(feats).all()

    # a shard of --slides slides (copies of the manifest): one loader for all of them (how a
    # job runs them) against one loader per slide (workers started, first chunks awaited, per slide)
    if a.slides > 1:
        parts = [PatchDataset(rec["path"], f"{rec['slide_id']}~{k}", rec["mpp"], cycled(manifest, len(manifest)),
                              enc.input_px, a.read) for k in range(a.slides)]
        kw = dict(device=device, precision=precision, batch_size=a.batch_size, num_workers=a.workers,
                  channels_last=True, compile=a.compile)
        t0 = time.perf_counter()
        for part in parts:
            encode_patches(part, enc, **kw)
        per_slide = time.perf_counter() - t0
        shard = encode_shard(ShardPatches(parts), enc, lambda *_: None, **kw)
        total = len(manifest) * a.slides
        res["shard_slides"] = a.slides
        res["shard_one_loader_images_per_s"] = round(total / shard["elapsed_s"], 1)
        res["shard_loader_per_slide_images_per_s"] = round(total / per_slide, 1)

    width = max(map(len, res))
    for key, value in res.items():
        print(f"{key:{width}s}  {value}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
