"""Image features of one slide: every patch of its tile manifest through a frozen encoder, to HDF5.

Writes ``results/features/{encoder}/{slide}.h5`` atomically (see :mod:`mrplip_core.features.h5`
for the layout). Rows of each magnification group are in tile-manifest order and carry
their patch ids, so a row never has to be matched by position alone.

A slide the tiles stage recorded as failed, or whose manifest is empty, gets a valid file
with zero rows and ``status: empty`` plus the reason. A slide that fails while its
patches are read (file gone, corrupt tile) gets ``status: failed`` and the error, unless
``failures_fatal``. Configuration errors (weights that do not fit, no GPU when one is
asked for) always raise: they are not a property of the slide.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import openslide
import pandas as pd
import torch

from mrplip_core.encoders import get_spec
from mrplip_core.encoders.build import find_checkpoint, resolve_weights
from mrplip_core.encoders.image import ImageEncoder, load_image_encoder
from mrplip_core.encoders.runtime import autocast, resolve_device, resolve_precision
from mrplip_core.encoders.spec import EncoderSpec
from mrplip_core.encoders.weights import RANDOM_INIT, weights_sha256
from mrplip_core.features.dataset import PatchDataset, patch_loader
from mrplip_core.features.h5 import IMAGE_FORMAT, package_versions, set_attrs, write_features, write_strings
from mrplip_core.features.settings import FeatureSettings
from mrplip_core.io.atomic import atomic_path
from mrplip_core.wsi.magnification import format_magnification
from mrplip_core.wsi.slide import SlideError

#: Errors while reading a slide's patches that mean "this slide cannot be used".
SLIDE_FAILURES = (SlideError, openslide.OpenSlideError, OSError)


def encode_patches(
    dataset: PatchDataset,
    encoder: ImageEncoder,
    *,
    device: torch.device,
    precision: str,
    batch_size: int = 256,
    num_workers: int = 0,
    channels_last: bool = True,
    compile: bool = False,
) -> tuple[np.ndarray, dict[str, float]]:
    """Run every patch of ``dataset`` through ``encoder``; ``(features (N, D) float16, timings)``.

    Batches come from a DataLoader (``num_workers`` processes, pinned memory on GPU),
    cross to the device as uint8, are normalised there and run under autocast
    (``precision``). Features stay on the device until the end, so the loop never waits
    for the GPU. With ``compile`` the last batch is padded to ``batch_size`` (no recompile).
    Timings: ``elapsed_s`` (whole loop), ``loader_wait_s`` (time blocked on the loader;
    near zero when the loader keeps up), ``images_per_s``.
    """
    n = len(dataset)
    module = encoder.module.to(device).eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    run = torch.compile(module, dynamic=False) if compile else module
    out = torch.empty((n, encoder.dim), dtype=torch.float16, device=device)
    loader = patch_loader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    wait, done = 0.0, 0
    t0 = time.perf_counter()
    batches = iter(loader)
    with torch.inference_mode():
        while True:
            tw = time.perf_counter()
            try:
                idx, images = next(batches)
            except StopIteration:
                break
            wait += time.perf_counter() - tw
            b = len(idx)
            if int(idx[0]) != done or int(idx[-1]) != done + b - 1:
                raise RuntimeError(f"patch loader returned rows {int(idx[0])}..{int(idx[-1])}, expected {done}..")
            x = encoder.normalize(images.to(device, non_blocking=True), channels_last=channels_last)
            if compile and b < batch_size:
                x = torch.cat([x, x.new_zeros((batch_size - b, *x.shape[1:]))])
            with autocast(device, precision):  # type: ignore[arg-type]
                y = run(x)
            out[done : done + b] = y[:b].to(torch.float16)
            done += b
    feats = out.cpu().numpy()
    elapsed = time.perf_counter() - t0
    dataset.close()
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        raise FloatingPointError(
            f"encoder {encoder.spec.name!r}: {int(bad.sum())} patch(es) gave non-finite features "
            f"(first rows {np.flatnonzero(bad)[:5].tolist()}); try precision fp32"
        )
    return feats, {
        "elapsed_s": round(elapsed, 3),
        "loader_wait_s": round(wait, 3),
        "images_per_s": round(n / elapsed, 1) if elapsed > 0 else 0.0,
    }


def extract_image_features(
    slide_id: str,
    manifest: str | Path,
    record: str | Path,
    out: str | Path,
    settings: FeatureSettings,
    *,
    encoder: ImageEncoder | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Features of every patch of one slide into ``out`` (HDF5, written atomically).

    Parameters
    ----------
    slide_id: the slide.
    manifest: ``results/tiles/{slide}.parquet`` (MANIFEST_COLUMNS).
    record: ``results/slides/{slide}.json`` (the slide's path, resolved mpp and status).
    out: ``results/features/{encoder}/{slide}.h5``.
    settings: the config's ``features`` section (plus the top-level ``failures_fatal``).
    encoder: an already built encoder (tests, benchmarks); default: build
        ``settings.image_encoder`` with its configured weights.
    threads: the job's cores, the default number of DataLoader workers.

    Returns
    -------
    A summary: ``status`` (ok | empty | failed), ``n_patches``, groups, timings, ``error``.
    """
    manifest_df = pd.read_parquet(manifest)
    rec = json.loads(Path(record).read_text())
    spec = encoder.spec if encoder is not None else get_spec(settings.image_encoder)
    base = {
        "format": IMAGE_FORMAT,
        "slide_id": slide_id,
        "manifest": str(manifest),
        "features_dtype": "float16",
        **package_versions(*_libraries(spec)),
    }
    if rec.get("status") != "ok" or manifest_df.empty:
        reason = (
            f"the tiles stage failed for this slide: {rec.get('error')}"
            if rec.get("status") != "ok"
            else "the tile manifest has no patches (no tissue passed the tiling thresholds)"
        )
        attrs = encoder.attrs() if encoder is not None else _spec_attrs_without_model(spec, settings)
        _write_empty(out, {**base, **attrs}, status="empty", message=reason)
        return {"slide_id": slide_id, "status": "empty", "n_patches": 0, "error": reason}

    enc = encoder or load_image_encoder(
        spec, settings.weights_for(spec.name, spec.weights_key), allow_random_init=settings.allow_random_init
    )
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, enc.spec, device)
    workers = settings.workers(threads)
    run = {
        "device": str(device),
        "precision": precision,
        "batch_size": settings.batch_size,
        "num_workers": workers,
        "channels_last": settings.channels_last,
        "compile": settings.compile,
        "read": settings.read,
    }
    dataset = PatchDataset(rec["path"], slide_id, rec["mpp"], manifest_df, enc.input_px, settings.read)  # type: ignore[arg-type]
    try:
        feats, timings = encode_patches(
            dataset,
            enc,
            device=device,
            precision=precision,
            batch_size=settings.batch_size,
            num_workers=workers,
            channels_last=settings.channels_last,
            compile=settings.compile,
        )
    except SLIDE_FAILURES as exc:
        if settings.failures_fatal:
            raise
        message = str(exc) if slide_id in str(exc) else f"slide {slide_id!r}: {exc}"
        _write_empty(out, {**base, **enc.attrs(), **run}, status="failed", message=message)
        return {"slide_id": slide_id, "status": "failed", "n_patches": 0, "error": message}

    groups = []
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        mags = manifest_df["magnification"].to_numpy(float)
        for mag in sorted(set(mags.tolist())):
            rows = np.flatnonzero(mags == mag)
            sub = manifest_df.iloc[rows]
            name = format_magnification(mag)
            g = f.create_group(name)
            write_features(g, feats[rows])
            write_strings(g, "patch_ids", sub["patch_id"])
            g.create_dataset("rows", data=rows.astype(np.int64))
            g.create_dataset("coords", data=sub[["x", "y"]].to_numpy(np.int64).reshape(-1, 2))
            set_attrs(g, {
                **enc.attrs(),
                "magnification": float(mag),
                "n": int(len(rows)),
                "size": int(sub["size"].iloc[0]),
                "patch_px": int(sub["patch_px"].iloc[0]),
                "mpp": float(sub["mpp"].iloc[0]),
            })
            groups.append(name)
        set_attrs(f, {
            **base,
            **enc.attrs(),
            **run,
            **timings,
            "status": "ok",
            "reason": "",
            "n_patches": int(len(manifest_df)),
            "magnifications": groups,
        })
    return {"slide_id": slide_id, "status": "ok", "n_patches": int(len(manifest_df)), "groups": groups,
            "encoder": enc.spec.name, "weights": enc.weights.source, **run, **timings, "error": None}


def _write_empty(out: str | Path, attrs: dict[str, Any], *, status: str, message: str) -> None:
    """A valid features file with no groups and zero rows, saying why."""
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        set_attrs(f, {**attrs, "status": status, "reason": message, "n_patches": 0, "magnifications": []})


def _spec_attrs_without_model(spec: EncoderSpec, settings: FeatureSettings) -> dict[str, Any]:
    """Encoder attrs for a file with no rows, without building the model (weights hashed only)."""
    path = resolve_weights(spec, settings.weights_for(spec.name, spec.weights_key), settings.allow_random_init)
    if path is None:
        weights = {"weights": RANDOM_INIT, "weights_sha256": "not computed (no patches, model not built)"}
    else:
        checkpoint = path if path.is_file() else find_checkpoint(path, f"encoder {spec.name!r}")
        weights = {"weights": str(checkpoint), "weights_sha256": weights_sha256(checkpoint)}
    return {**spec.attrs(), **weights, "input_px": spec.input_px, "mean": list(spec.mean), "std": list(spec.std),
            "interpolation": spec.interpolation}


def _libraries(spec: EncoderSpec) -> tuple[str, ...]:
    return {"timm": ("timm",), "open_clip": ("open_clip_torch",), "hf": ("transformers",)}[spec.family]
