"""The captioner interface and the ``morphology`` backend.

A backend is a context manager (it may load a model or start a server on entry) with a
``run(tasks, reader, emit)`` method: it captions every task, calling ``emit`` once per task
(in any order, always from the calling thread) with a :class:`CaptionResult`. A task it
could not caption is emitted with ``error`` set. A backend may raise instead (for example
when its server is gone); tasks not yet emitted are then simply still pending, and the
runner keeps everything emitted so far.

The language-model backends (:mod:`~mrplip_core.captions.openai_backend`,
:mod:`~mrplip_core.captions.transformers_backend`) build on this module;
:func:`mrplip_core.captions.backend_factory.make_backend` picks one by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Protocol

from mrplip_core.captions import morphology
from mrplip_core.captions.patches import PatchTask, SlideReader
from mrplip_core.captions.settings import CaptionSettings


@dataclass(frozen=True)
class CaptionResult:
    """The outcome for one patch."""

    task: PatchTask
    caption: str | None
    error: str | None = None


Emit = Callable[[CaptionResult], None]


class Captioner(Protocol):
    backend: str  # the value of the ``backend`` column
    model: str  # the value of the ``model`` column (known after __enter__)

    def params_json(self) -> str: ...

    def run(self, tasks: Iterable[PatchTask], reader: SlideReader, emit: Emit) -> None: ...

    def __enter__(self) -> Captioner: ...

    def __exit__(self, *exc: object) -> None: ...


def generation_params_json(settings: CaptionSettings) -> str:
    """``params`` of language-model rows: generation and image settings."""
    d = asdict(settings.generation)
    d["image_format"] = settings.image.format
    d["image_max_px"] = settings.image.max_px
    if settings.image.format == "jpeg":
        d["jpeg_quality"] = settings.image.jpeg_quality
    return json.dumps(d, sort_keys=True)


def bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator[tuple[object, Future]]:
    """Submit ``fn(item)`` to ``pool`` keeping at most ``window`` pending; yield in order."""
    pending: list[tuple[object, Future]] = []
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            yield pending.pop(0)
    yield from pending


class MorphologyBackend:
    """Offline deterministic captions from measurements (:mod:`mrplip_core.captions.morphology`)."""

    backend = "morphology"
    model = morphology.MODEL_ID

    def __init__(self, settings: CaptionSettings) -> None:
        self.threads = max(1, settings.io_threads)

    def params_json(self) -> str:
        return morphology.params_json()

    def __enter__(self) -> MorphologyBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, tasks: Iterable[PatchTask], reader: SlideReader, emit: Emit) -> None:
        def one(task: PatchTask) -> str:
            return morphology.caption_patch(reader.read(task), task.magnification, task.mpp)

        with ThreadPoolExecutor(self.threads, thread_name_prefix="morphology") as pool:
            for task, fut in bounded_map(pool, one, tasks, 4 * self.threads):
                try:
                    emit(CaptionResult(task, fut.result()))
                except Exception as exc:  # noqa: BLE001 - a patch that cannot be read is recorded
                    emit(CaptionResult(task, None, f"{type(exc).__name__}: {exc}"))
