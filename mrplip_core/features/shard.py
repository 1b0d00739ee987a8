"""Image features of several slides in one job: the encoder is built once.

At cohort scale the encoder load (UNI-L: 1.2 GB of weights, CUDA start) costs more than
encoding one slide's ~1,700 patches, so a GPU job takes ``features.slides_per_job`` slides.
Each slide is written first to ``{features}/.parts/{key}/{slide}.h5`` (atomically), then
hard-linked to its output ``{features}/{slide}.h5``. When a job dies, Snakemake deletes the
outputs of the whole shard, but not the parts: the rerun links the finished slides back and
encodes only the rest. ``key`` is a digest of what changes a feature (the rule's rerun
trigger), so parts made under other settings or weights are never reused, and a part older
than its slide's tile manifest or record is encoded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mrplip_core.encoders import get_spec
from mrplip_core.features.settings import FeatureSettings

log = logging.getLogger(__name__)

PARTS = ".parts"


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
    encoded again, as Snakemake would rerun a job per slide)."""
    try:
        made = part.stat().st_mtime_ns
        return all(made >= p.stat().st_mtime_ns for p in inputs)
    except FileNotFoundError:
        return False


def extract_image_shard(slide_ids: Sequence[str], results: str | Path, settings: FeatureSettings, *,
                        trigger: str, threads: int | None = None) -> list[dict[str, Any]]:
    """Features of ``slide_ids`` with ``settings.image_encoder`` built once.

    Inputs per slide: ``results/tiles/{slide}.parquet`` and ``results/slides/{slide}.json``;
    output ``results/features/{encoder}/{slide}.h5``. Returns one summary per slide (see
    :func:`mrplip_core.features.image.extract_image_features`), ``status: reused`` for a
    slide whose part a previous run of the same shard had finished.
    """
    from mrplip_core.encoders.image import load_image_encoder
    from mrplip_core.features.image import extract_image_features

    results = Path(results)
    name = settings.image_encoder
    folder = results / "features" / name
    parts = folder / PARTS / parts_key(trigger)
    summaries: list[dict[str, Any]] = []
    todo = []
    for sid in slide_ids:
        part = parts / f"{sid}.h5"
        if _fresh(part, results / "tiles" / f"{sid}.parquet", results / "slides" / f"{sid}.json"):
            _publish(part, folder / f"{sid}.h5")
            summaries.append({"slide_id": sid, "status": "reused", "part": str(part)})
            log.info("%s: finished by an earlier run of this shard (%s)", sid, part)
        else:
            todo.append(sid)
    if not todo:
        return summaries
    spec = get_spec(name)
    encoder = load_image_encoder(spec, settings.weights_for(spec.name, spec.weights_key),
                                 allow_random_init=settings.allow_random_init)
    parts.mkdir(parents=True, exist_ok=True)
    for sid in todo:
        part = parts / f"{sid}.h5"
        s = extract_image_features(sid, results / "tiles" / f"{sid}.parquet", results / "slides" / f"{sid}.json",
                                   part, settings, encoder=encoder, threads=threads)
        _publish(part, folder / f"{sid}.h5")
        summaries.append(s)
    return summaries
