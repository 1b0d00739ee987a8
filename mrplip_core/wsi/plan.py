"""The tiles stage's plan: its settings, what reruns it, and its job unit.

``rules/tiles.smk`` only turns this into rules. Plain Python with no heavy imports: Snakemake
reads it while building the DAG.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mrplip_core.jobs import JobUnit, settings_json

#: Config sections the ``mrplip tiles`` verb reads.
SECTIONS = ("wsi", "mpp_fallback", "failures_fatal", "tissue", "tiling")
#: Keys of ``wsi`` that say how jobs are cut, not what a tile is: not a rerun trigger.
JOB_KEYS = ("slides_per_job",)


@dataclass(frozen=True)
class TilesPlan(JobUnit):
    """Tiles jobs of a (validated) workflow config."""

    settings_arg: str  # --settings of `mrplip tiles`: the SECTIONS
    trigger: str  # what changes a tile: the SECTIONS without the job unit
    slides_per_job: int  # 1: a job per slide; N: a job per shard of N slides

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TilesPlan:
        wsi = dict(config.get("wsi") or {})
        spj = int(wsi.get("slides_per_job", 1))
        trigger = settings_json(config, *SECTIONS, wsi={k: v for k, v in wsi.items() if k not in JOB_KEYS})
        return cls(settings_json(config, *SECTIONS), trigger, spj)


def slide_rows(slides: Any, slide_ids: Sequence[str]) -> str:
    """Rerun trigger of a tiles job: each slide's file and mpp override from the slide table
    (``slides``: the table indexed by slide_id, with ``path`` and ``mpp``)."""
    from mrplip_core.wsi.table import table_mpp

    return json.dumps([[s, str(slides.at[s, "path"]), table_mpp(slides, s)] for s in slide_ids])
