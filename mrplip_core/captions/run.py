"""Caption the patches of one slide or a shard of slides, resumably.

:func:`caption_slides` is what ``mrplip captions`` (and so the Snakemake rule) runs. All
slides of a shard share one backend (one server start, one model load), and their patches
form one stream so the server's batch stays full across slide boundaries. Each slide is
finalized (:func:`~mrplip_core.captions.parts.finalize`) as soon as its last patch is in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from mrplip_core.captions.backend_factory import make_backend
from mrplip_core.captions.backends import CaptionResult, Captioner
from mrplip_core.captions.parts import PartWriter, finalize, parts_dir, prune_parts, read_parts, settled_patch_ids
from mrplip_core.captions.patches import PatchTask, SlideReader, load_manifest, tasks_from_manifest
from mrplip_core.captions.progress import Progress
from mrplip_core.captions.schema import CAPTION_ARROW_SCHEMA, empty_captions
from mrplip_core.captions.settings import CaptionSettings
from mrplip_core.layout import Layout
from mrplip_core.io.atomic import atomic_path

log = logging.getLogger("mrplip.captions")


@dataclass(frozen=True)
class SlideJob:
    """Inputs and output of one slide: its tile manifest, its record, its captions file."""

    slide_id: str
    manifest: Path  # results/tiles/{slide}.parquet
    record: Path  # results/slides/{slide}.json
    out: Path  # results/captions/{slide}.parquet

    @classmethod
    def under(cls, results: str | Path, slide_id: str) -> SlideJob:
        """The standard layout below a results folder (:mod:`mrplip_core.layout`)."""
        layout = Layout(results)
        return cls(slide_id, layout.tiles(slide_id), layout.slide_record(slide_id), layout.captions(slide_id))


@dataclass
class _SlideState:
    job: SlideJob
    order: list[str]  # manifest patch ids
    writer: PartWriter
    remaining: int


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (Snakemake or Slurm cancelling the job) into SystemExit, so cleanup runs."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_empty(out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(out) as tmp:
        pq.write_table(pa.Table.from_pandas(empty_captions(), schema=CAPTION_ARROW_SCHEMA, preserve_index=False), tmp)


def caption_slides(
    jobs: list[SlideJob],
    settings: CaptionSettings,
    *,
    backend: Captioner | None = None,
    log_dir: str | Path | None = None,
    progress_interval_s: float = 10.0,
) -> dict:
    """Caption every patch of every slide in ``jobs``; returns a summary dict.

    A slide whose record is not ``ok`` or whose manifest is empty gets an empty captions
    file. Patches already captioned in earlier part files are not requested again. Raises
    whatever the backend raises (e.g. :class:`~mrplip_core.serving.client.ServerGone`)
    after flushing every result received, so a rerun loses nothing.
    """
    t0 = time.monotonic()
    digest = settings.digest()
    states: dict[str, _SlideState] = {}
    where: dict[str, tuple[str, float]] = {}
    pending: list[PatchTask] = []
    shared: dict[str, tuple[pd.DataFrame, list[PatchTask]]] = {}  # per slide: manifest, tasks
    summary: dict = {"slides": {}, "digest": digest, "backend": settings.backend}
    finalized: list[Path] = []  # parts folders, deleted only when the whole job succeeds

    for job in jobs:
        record = json.loads(Path(job.record).read_text())
        manifest = load_manifest(job.manifest)
        if record.get("status") != "ok" or manifest.empty:
            _write_empty(job.out)
            summary["slides"][job.slide_id] = {"patches": 0, "requested": 0, "status": record.get("status")}
            continue
        order = list(manifest["patch_id"])
        folder = parts_dir(job.out)
        done = read_parts(folder, digest)
        skip = settled_patch_ids(done, settings.retry_errors)
        todo = tasks_from_manifest(manifest, settings, skip)
        summary["slides"][job.slide_id] = {"patches": len(order), "resumed": len(skip), "requested": len(todo)}
        log.info("%s: %d patches, %d already captioned, %d to caption", job.slide_id, len(order), len(skip), len(todo))
        if not todo:
            finalize(job.out, order, digest, settings.max_error_fraction, keep_parts=True)
            finalized.append(folder)
            continue
        where[job.slide_id] = (record["path"], float(record["mpp"]))
        writer = PartWriter(folder, digest, settings.flush_rows, settings.flush_seconds)
        states[job.slide_id] = _SlideState(job, order, writer, len(todo))
        shared[job.slide_id] = (manifest, todo)
        pending.extend(todo)

    if not pending:
        _remove_parts(finalized)
        summary["elapsed_s"] = round(time.monotonic() - t0, 2)
        return summary

    reader = SlideReader(where)
    for sid, (manifest, todo) in shared.items():
        reader.share_reads(sid, manifest, todo)
    progress = Progress(len(pending), interval_s=progress_interval_s)
    backend = backend or make_backend(settings, log_dir=log_dir)
    failures: list[str] = []
    # part files and final files are written by one background thread, in submission order,
    # so a slow disk (fsync) never stalls the requests in flight
    disk = ThreadPoolExecutor(1, thread_name_prefix="parts")
    for st in states.values():
        st.writer.executor = disk

    def finish(st: _SlideState) -> None:  # runs on the disk thread, after the slide's parts
        try:
            finalize(st.job.out, st.order, digest, settings.max_error_fraction, keep_parts=True)
            finalized.append(st.writer.folder)
        except RuntimeError as exc:  # too many failures: parts kept, reported at the end
            log.error("%s: %s", st.job.slide_id, exc)
            failures.append(f"{st.job.slide_id}: {exc}")

    with _sigterm_as_exit():
        try:
            with backend:
                params = backend.params_json()
                model = backend.model

                def emit(res: CaptionResult) -> None:
                    st = states[res.task.slide_id]
                    st.writer.add({
                        "patch_id": res.task.patch_id, "prompt": res.task.prompt, "caption": res.caption,
                        "model": model, "backend": backend.backend, "params": params, "error": res.error,
                    })
                    st.remaining -= 1
                    progress.update(error=res.error is not None)
                    if st.remaining == 0:
                        st.writer.flush()
                        reader.close(st.job.slide_id)
                        st.writer.futures.append(disk.submit(finish, st))

                backend.run(pending, reader, emit)
        finally:
            for st in states.values():
                st.writer.flush()  # everything received survives an abort
            disk.shutdown(wait=True)
            reader.close()
            progress.close()
    for st in states.values():
        for fut in st.writer.futures:
            fut.result()  # a part that could not be written fails the job
    summary["elapsed_s"] = round(time.monotonic() - t0, 2)
    summary["patches_per_s"] = round(progress.rate, 3)
    summary["errors"] = progress.errors
    for attr in ("requests_sent", "retries"):
        if hasattr(backend, attr):
            summary[attr] = getattr(backend, attr)
    if failures:
        raise RuntimeError("; ".join(failures))
    _remove_parts(finalized)
    return summary


def _remove_parts(folders: list[Path]) -> None:
    for folder in folders:
        prune_parts(folder)  # keeps final.parquet, the link of the final file (see parts.py)

