"""The job unit of the per-slide stages, and the one shape of a verb's ``--settings``.

A per-slide stage runs as one Snakemake job per slide (``slides_per_job: 1``, the demo) or one
job per shard of ``slides_per_job`` slides (a cohort: the plan of 20,000 slides stays a few
hundred jobs per stage, and a GPU job loads its model once for many slides). Every stage
plan (``wsi/plan.py``, ``captions/plan.py``, ``features/plan.py``) takes its shards from here.

Every ``mrplip`` verb that the rules call takes ``--settings`` as a JSON object of the config
sections it uses, keyed by section name (``{"features": {...}, "failures_fatal": false}``):
:func:`settings_json` writes it, :func:`read_sections` reads it back.

This module imports only ``io.atomic`` of the project (the layer below it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def shard_slides(slide_ids: Sequence[str], slides_per_job: int) -> list[list[str]]:
    """Contiguous groups of ``slides_per_job`` slides, in slide-table order.

    Contiguous, so appending slides to the table changes only the last shard.
    """
    ids = list(slide_ids)
    n = max(1, int(slides_per_job))
    return [ids[i : i + n] for i in range(0, len(ids), n)]


class JobUnit:
    """Mixin of a per-slide stage's plan: the job unit from its ``slides_per_job``."""

    slides_per_job: int

    @property
    def per_slide(self) -> bool:
        """A Snakemake job per slide (``slides_per_job`` 1), else one per shard."""
        return self.slides_per_job <= 1

    def shards(self, slide_ids: Sequence[str]) -> list[list[str]]:
        return shard_slides(slide_ids, self.slides_per_job)


def settings_json(config: Mapping[str, Any], *sections: str, **replace: Any) -> str:
    """JSON of the config ``sections`` a verb uses (``replace`` swaps a section for another
    value, e.g. a resolved one), keys sorted so equal settings give equal strings."""
    out = {s: config.get(s) for s in sections}
    out.update(replace)
    return json.dumps(out, sort_keys=True)


def read_sections(text: str | None, *sections: str, verb: str) -> dict[str, Any]:
    """The sections of a ``--settings`` JSON; a missing one is an error naming it and the verb.

    ``text`` empty or None means no settings: every section is absent (None), and the verb
    uses its defaults.
    """
    if not text:
        return {s: None for s in sections}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"mrplip {verb}: --settings is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"mrplip {verb}: --settings must be a JSON object of config sections, got {data!r:.80}")
    missing = [s for s in sections if s not in data]
    if missing:
        raise ValueError(f"mrplip {verb}: --settings lacks the config section(s) {missing}; "
                         f"it is a JSON object keyed by section name (got keys {sorted(data)})")
    return {s: data[s] for s in sections}


def shards_holding(slide_ids: Sequence[str], shards: Sequence[Sequence[str]]) -> list[int]:
    """Indices of the ``shards`` that hold any of ``slide_ids`` (a later stage's shard waits for
    these shards of an earlier stage), in order."""
    wanted = set(slide_ids)
    return [i for i, shard in enumerate(shards) if wanted.intersection(shard)]


def write_shard_marker(path: str | os.PathLike[str], stage: str, slide_ids: Sequence[str], **info: Any) -> Path:
    """Write the marker of a finished shard job (``layout`` ``*_shard`` artifacts): JSON of the
    stage, its slides and ``info``, under a temporary name and then renamed, so a killed job
    never leaves a marker."""
    from mrplip_core.io.atomic import write_text

    return write_text(json.dumps({"stage": stage, "slides": list(slide_ids), **info}, indent=1), path)
