"""Image features of slides: every patch of each tile manifest through a frozen encoder, to HDF5.

Writes ``results/features/{encoder}/{slide}.h5`` atomically (see :mod:`mrplip_core.features.h5`
for the layout). Rows of each magnification group are in tile-manifest order and carry
their patch ids, so a row never has to be matched by position alone.

A slide the tiles stage recorded as failed, or whose manifest is empty, gets a valid file
with zero rows and ``status: empty`` plus the reason. A slide that fails while its
patches are read (file gone, corrupt tile) gets ``status: failed`` and the error, unless
``failures_fatal``. Configuration errors (weights that do not fit, no GPU when one is
asked for) and trouble of the machine (a full disk, too many open files, a DataLoader
worker killed) always raise: they are not a property of the slide, and the job is retried.

A job of several slides (a shard) runs them all through one DataLoader, so its workers
never idle at a slide boundary, and writes each slide's file as soon as it is complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch

from mrplip_core.encoders import get_spec
from mrplip_core.encoders.build import find_checkpoint, open_clip_config, resolve_weights
from mrplip_core.encoders.image import ImageEncoder, load_image_encoder, open_clip_input
from mrplip_core.encoders.runtime import autocast, resolve_device, resolve_precision
from mrplip_core.encoders.spec import EncoderSpec
from mrplip_core.encoders.weights import RANDOM_INIT, weights_sha256
from mrplip_core.features.dataset import PatchDataset, ShardPatches, patch_loader
from mrplip_core.features.h5 import IMAGE_FORMAT, package_versions, set_attrs, write_features, write_strings
from mrplip_core.features.settings import FeatureSettings
from mrplip_core.io.atomic import atomic_path
from mrplip_core.wsi.magnification import format_magnification

SlideDone = Callable[[int, "np.ndarray | None", "str | None", dict[str, float]], None]


def encode_shard(
    dataset: ShardPatches,
    encoder: ImageEncoder,
    on_slide: SlideDone,
    *,
    device: torch.device,
    precision: str,
    batch_size: int = 256,
    num_workers: int = 0,
    channels_last: bool = True,
    compile: bool = False,
) -> dict[str, float]:
    """Run every patch of a shard's slides through ``encoder``, one DataLoader for all of them.

    Workers read whole bags (:func:`~mrplip_core.features.dataset.patch_loader`); each chunk
    crosses to the device as uint8 at once (pinned memory, non-blocking) and the chunks are
    regrouped there into model batches of exactly ``batch_size`` (the last one padded with
    ``compile``, so nothing recompiles), normalised and run under autocast (``precision``).
    Features stay on the device until a slide is complete (only the batches of slides not
    yet written are kept); then ``on_slide(k, features (n_k, D) float16 | None, error | None,
    timings)`` is called, in slide order, with the slide's error if a worker could not read
    it or (with ``dataset.catch``) its features were not finite.
    Timings: ``elapsed_s`` (since the previous slide), ``loader_wait_s`` (time blocked on
    the loader in that span; near zero when the loader keeps up), ``images_per_s``.
    Returns the same for the whole shard.
    """
    n = len(dataset)
    offsets = dataset.offsets.tolist()
    module = encoder.module.to(device).eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    run = torch.compile(module, dynamic=False) if compile else module
    # model outputs of batches whose slides are not all written yet: (first row, float16
    # features, rows whose output was not finite before the cast); dropped once written
    outputs: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    errors: dict[int, str] = {}
    state = {"done": 0, "slide": 0, "t": time.perf_counter(), "wait": 0.0}
    t0 = time.perf_counter()
    total_wait = 0.0

    def forward(x: torch.Tensor) -> None:
        b, done = len(x), state["done"]
        if compile and b < batch_size:  # pad the uint8 batch: same shape and strides as every other
            x = torch.cat([x, x.new_zeros((batch_size - b, *x.shape[1:]))])
        x = encoder.normalize(x, channels_last=channels_last)
        with autocast(device, precision):  # type: ignore[arg-type]
            y = run(x)[:b].float()
        outputs.append((done, y.to(torch.float16), ~torch.isfinite(y).all(dim=1)))
        state["done"] = done + b
        while state["slide"] < len(offsets) - 1 and offsets[state["slide"] + 1] <= state["done"]:
            finish(state["slide"])
            state["slide"] += 1

    def rows(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and non-finite flags of rows a..b (on the host); drops what ends before b."""
        parts = [(max(a, s) - s, min(b, s + len(f)) - s, f, bad) for s, f, bad in outputs if s < b and s + len(f) > a]
        feats = torch.cat([f[i:j] for i, j, f, _ in parts]).cpu().numpy()
        bad = torch.cat([bad[i:j] for i, j, _, bad in parts]).cpu().numpy()
        outputs[:] = [o for o in outputs if o[0] + len(o[1]) > b]
        return feats, bad

    def finish(k: int) -> None:
        a, b = offsets[k], offsets[k + 1]
        now = time.perf_counter()
        elapsed = now - state["t"]
        timings = {"elapsed_s": round(elapsed, 3), "loader_wait_s": round(state["wait"], 3),
                   "images_per_s": round((b - a) / elapsed, 1) if elapsed > 0 else 0.0}
        state["t"], state["wait"] = now, 0.0
        feats, nonfinite = rows(a, b) if b > a else (np.zeros((0, encoder.dim), np.float16), np.zeros(0, bool))
        if k not in errors:
            try:
                _check_finite(encoder, dataset.slides[k].slide_id, nonfinite, feats)
            except FloatingPointError as exc:
                if not dataset.catch:
                    raise
                errors[k] = str(exc)  # this slide's patches; the other slides go on
        if k in errors:
            on_slide(k, None, errors[k], timings)
        else:
            on_slide(k, feats, None, timings)

    loader = patch_loader(dataset, num_workers=num_workers, pin_memory=device.type == "cuda")
    pending: list[torch.Tensor] = []  # uint8 chunks on the device, not yet through the model
    received = 0
    chunks = iter(loader)
    try:
        with torch.inference_mode():
            while True:
                tw = time.perf_counter()
                try:
                    idx, images, errs = next(chunks)
                except StopIteration:
                    break
                waited = time.perf_counter() - tw
                state["wait"] += waited
                total_wait += waited
                m = len(idx)
                if int(idx[0]) != received or int(idx[-1]) != received + m - 1:
                    raise RuntimeError(f"patch loader returned rows {int(idx[0])}..{int(idx[-1])}, expected {received}..")
                for j in (j for j, e in enumerate(errs) if e):
                    errors.setdefault(dataset.slide_of(int(idx[j])), errs[j])
                pending.append(images.to(device, non_blocking=True))
                received += m
                while received - state["done"] >= batch_size:
                    x = torch.cat(pending) if len(pending) > 1 else pending[0]
                    forward(x[:batch_size])
                    pending = [x[batch_size:]] if len(x) > batch_size else []
            if pending:
                forward(torch.cat(pending))
        while state["slide"] < len(offsets) - 1:  # slides with no rows
            finish(state["slide"])
            state["slide"] += 1
    finally:
        del chunks
        dataset.close()
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": round(elapsed, 3), "loader_wait_s": round(total_wait, 3),
            "images_per_s": round(n / elapsed, 1) if elapsed > 0 else 0.0}


def _check_finite(encoder: ImageEncoder, slide_id: str, nonfinite: np.ndarray, feats: np.ndarray) -> None:
    """Non-finite model outputs (a precision problem) or values beyond float16's range (storage)."""
    if nonfinite.any():
        raise FloatingPointError(
            f"encoder {encoder.spec.name!r}, slide {slide_id!r}: {int(nonfinite.sum())} patch(es) gave non-finite "
            f"features (first rows {np.flatnonzero(nonfinite)[:5].tolist()}); try precision fp32"
        )
    over = ~np.isfinite(feats).all(axis=1)
    if over.any():
        raise FloatingPointError(
            f"encoder {encoder.spec.name!r}, slide {slide_id!r}: {int(over.sum())} patch(es) have feature values "
            f"beyond float16's range (|x| > 65504; first rows {np.flatnonzero(over)[:5].tolist()}), the storage "
            "format: the encoder's outputs are not what its spec says"
        )


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
    """Every patch of one slide through ``encoder`` (:func:`encode_shard` of one slide):
    ``(features (N, D) float16, timings)``; a slide read error is raised."""
    got: dict[str, Any] = {}

    def keep(_: int, feats: np.ndarray | None, error: str | None, timings: dict[str, float]) -> None:
        got.update(feats=feats, error=error)

    timings = encode_shard(ShardPatches([dataset], catch=False), encoder, keep, device=device, precision=precision,
                           batch_size=batch_size, num_workers=num_workers, channels_last=channels_last,
                           compile=compile)
    return got["feats"], timings


@dataclass(frozen=True)
class SlideJob:
    """One slide of an image-features job (paths as the tiles stage writes them)."""

    slide_id: str
    manifest: Path  # results/tiles/{slide}.parquet
    record: Path  # results/slides/{slide}.json
    out: Path  # results/features/{encoder}/{slide}.h5 (or a shard's part file)


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
    job = SlideJob(slide_id, Path(manifest), Path(record), Path(out))
    return extract_image_slides([job], settings, encoder=encoder, threads=threads)[0]


def extract_image_slides(
    jobs: list[SlideJob],
    settings: FeatureSettings,
    *,
    encoder: ImageEncoder | None = None,
    threads: int | None = None,
    on_done: Callable[[SlideJob, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Features of several slides, each into its ``out``, with one encoder and one DataLoader.

    A slide the tiles stage recorded as failed, or with no patches, gets an ``empty`` file at
    once; a slide that cannot be read gets a ``failed`` file (unless ``failures_fatal``) and
    the others go on. ``on_done(job, summary)`` runs after each slide's file is written (in
    slide order). Returns the summaries in ``jobs`` order (see :func:`extract_image_features`).
    """
    spec = encoder.spec if encoder is not None else get_spec(settings.image_encoder)
    summaries: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, SlideJob, pd.DataFrame, dict]] = []
    for j, job in enumerate(jobs):
        manifest_df = pd.read_parquet(job.manifest)
        rec = json.loads(Path(job.record).read_text())
        if rec.get("status") != "ok" or manifest_df.empty:
            if rec.get("status") == "ok":
                reason = "the tile manifest has no patches (no tissue passed the tiling thresholds)"
            elif rec.get("error"):
                reason = f"the tiles stage failed for this slide: {rec.get('error')}"
            else:  # no_parents: read, but no box had enough tissue
                reason = f"the tiles stage recorded status {rec.get('status')!r}: {rec.get('reason')}"
            attrs = encoder.attrs() if encoder is not None else _spec_attrs_without_model(spec, settings)
            _write_empty(job.out, {**_base_attrs(job, spec), **attrs}, status="empty", message=reason)
            summaries[j] = {"slide_id": job.slide_id, "status": "empty", "n_patches": 0, "error": reason}
            if on_done:
                on_done(job, summaries[j])
        else:
            todo.append((j, job, manifest_df, rec))
    if not todo:
        return [summaries[j] for j in range(len(jobs))]

    enc = encoder or load_image_encoder(
        spec, settings.weights_for(spec.name, spec.weights_key), allow_random_init=settings.allow_random_init
    )
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, enc.spec, device)
    run = {
        "device": str(device),
        "precision": precision,
        "batch_size": settings.batch_size,
        "num_workers": settings.workers(threads),
        "channels_last": settings.channels_last,
        "compile": settings.compile,
        "read": settings.read,
    }
    datasets = [PatchDataset(rec["path"], job.slide_id, rec["mpp"], df, enc.input_px, settings.read)  # type: ignore[arg-type]
                for _, job, df, rec in todo]

    def write(k: int, feats: np.ndarray | None, error: str | None, timings: dict[str, float]) -> None:
        j, job, manifest_df, _ = todo[k]
        base = {**_base_attrs(job, enc.spec), **enc.attrs(), **run}
        if feats is None:
            _write_empty(job.out, base, status="failed", message=str(error))
            summary = {"slide_id": job.slide_id, "status": "failed", "n_patches": 0, "error": error}
        else:
            groups = _write_features(job.out, manifest_df, feats, enc, {**base, **timings})
            summary = {"slide_id": job.slide_id, "status": "ok", "n_patches": int(len(manifest_df)), "groups": groups,
                       "encoder": enc.spec.name, "weights": enc.weights.source, **run, **timings, "error": None}
        summaries[j] = summary
        if on_done:
            on_done(job, summary)

    encode_shard(ShardPatches(datasets, catch=not settings.failures_fatal), enc, write, device=device,
                 precision=precision, batch_size=settings.batch_size, num_workers=run["num_workers"],
                 channels_last=settings.channels_last, compile=settings.compile)
    return [summaries[j] for j in range(len(jobs))]


def _base_attrs(job: SlideJob, spec: EncoderSpec) -> dict[str, Any]:
    return {"format": IMAGE_FORMAT, "slide_id": job.slide_id, "manifest": str(job.manifest),
            "features_dtype": "float16", **package_versions(*_libraries(spec))}


def _write_features(out: Path, manifest_df: pd.DataFrame, feats: np.ndarray, enc: ImageEncoder,
                    attrs: dict[str, Any]) -> list[str]:
    """One group per magnification, rows in manifest order (see mrplip_core.features.h5)."""
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
        set_attrs(f, {**attrs, "status": "ok", "reason": "", "n_patches": int(len(manifest_df)),
                      "magnifications": groups})
    return groups


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
    input_px, mean, std = spec.input_px, spec.mean, spec.std
    if spec.family == "open_clip":  # the weights' preprocess_cfg decides, as when the model is built
        model_cfg, preprocess, _ = open_clip_config(spec, path)
        input_px, mean, std = open_clip_input(spec, model_cfg, preprocess)
    return {**spec.attrs(), **weights, "input_px": input_px, "mean": list(mean), "std": list(std),
            "interpolation": spec.interpolation}


def _libraries(spec: EncoderSpec) -> tuple[str, ...]:
    return {"timm": ("timm",), "open_clip": ("open_clip_torch",), "hf": ("transformers",)}[spec.family]
