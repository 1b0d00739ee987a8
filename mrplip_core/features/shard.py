"""Image features of several slides in one job: the encoder is built once, one DataLoader reads them all.

At cohort scale the encoder load (UNI-L: 1.2 GB of weights, CUDA start) costs more than
encoding one slide's ~1,700 patches, so a GPU job takes ``features.slides_per_job`` slides.
Each slide is written first to ``{features}/.parts/{key}/{slide}.h5`` (atomically), then
hard-linked to its output ``{features}/{slide}.h5``. When a job dies, Snakemake deletes the
outputs of the whole shard, but not the parts: the rerun links the finished slides back and
encodes only the rest. ``key`` is a digest of what changes a feature (the rule's rerun
trigger), so parts made under other settings or weights are never reused (and are removed
once the job has made the new ones), and a part older than its slide's tile manifest or
record, or one that recorded a failure, is encoded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py

from mrplip_core.encoders import get_spec
from mrplip_core.features.settings import FeatureSettings
from mrplip_core.layout import TEMPLATES, Layout

log = logging.getLogger(__name__)

PARTS = Path(TEMPLATES["image_features_parts"]).name  # .parts, below features/{encoder}/


def parts_key(trigger: str) -> str:
    """Folder name of the parts made under ``trigger`` (the rule's rerun trigger, a string)."""
    return hashlib.sha256(trigger.encode()).hexdigest()[:16]


def _publish(part: Path, out: Path) -> None:
    """``out`` becomes the finished ``part`` (a hard link; a copy where links are impossible)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        os.link(part, tmp)
    except OSError:
        import shutil

        shutil.copyfile(part, tmp)
    os.replace(tmp, out)


def _fresh(part: Path, *inputs: Path) -> bool:
    """A part is reused only when it is newer than the slide's inputs (a re-tiled slide is
    encoded again, as Snakemake would rerun a job per slide) and did not record a failure
    (a slide that could not be read is tried again: it fails fast if it still cannot)."""
    try:
        made = part.stat().st_mtime_ns
        if not all(made >= p.stat().st_mtime_ns for p in inputs):
            return False
        with h5py.File(part, "r") as f:
            return f.attrs.get("status") != "failed"
    except (FileNotFoundError, OSError):
        return False


def _drop_stale_parts(root: Path, key: str, slide_ids: Sequence[str]) -> None:
    """Remove these slides' parts made under other settings (they would only hold disk space:
    the outputs now link to the current ones)."""
    for other in root.iterdir() if root.is_dir() else ():
        if other.name == key or not other.is_dir():
            continue
        for sid in slide_ids:
            (other / f"{sid}.h5").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            other.rmdir()  # only when empty


def extract_image_shard(slide_ids: Sequence[str], results: str | Path | Layout, settings: FeatureSettings, *,
                        trigger: str, threads: int | None = None) -> list[dict[str, Any]]:
    """Features of ``slide_ids`` with ``settings.image_encoder`` built once, through one DataLoader.

    Inputs per slide: ``results/tiles/{slide}.parquet`` and ``results/slides/{slide}.json``;
    output ``results/features/{encoder}/{slide}.h5``. Returns one summary per slide (see
    :func:`mrplip_core.features.image.extract_image_features`), ``status: reused`` for a
    slide whose part a previous run of the same shard had finished.
    """
    from mrplip_core.encoders.image import load_image_encoder
    from mrplip_core.features.image import SlideJob, extract_image_slides

    layout = results if isinstance(results, Layout) else Layout(results)
    name = settings.image_encoder
    key = parts_key(trigger)
    parts = layout.image_features_parts(name) / key
    summaries: dict[str, dict[str, Any]] = {}
    todo = []
    for sid in slide_ids:
        part = parts / f"{sid}.h5"
        manifest, record = layout.tiles(sid), layout.slide_record(sid)
        if _fresh(part, manifest, record):
            _publish(part, layout.image_features(name, sid))
            summaries[sid] = {"slide_id": sid, "status": "reused", "part": str(part)}
            log.info("%s: finished by an earlier run of this shard (%s)", sid, part)
        else:
            todo.append(SlideJob(sid, manifest, record, part))
    if todo:
        spec = get_spec(name)
        encoder = load_image_encoder(spec, settings.weights_for(spec.name, spec.weights_key),
                                     allow_random_init=settings.allow_random_init)
        parts.mkdir(parents=True, exist_ok=True)
        done = extract_image_slides(todo, settings, encoder=encoder, threads=threads,
                                    on_done=lambda job, _: _publish(job.out, layout.image_features(name, job.slide_id)))
        summaries.update({s["slide_id"]: s for s in done})
    _drop_stale_parts(layout.image_features_parts(name), key, slide_ids)
    return [summaries[sid] for sid in slide_ids]
