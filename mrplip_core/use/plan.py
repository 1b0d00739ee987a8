"""The ``localize`` target's plan (rules/localize.smk): which models localise which queries on
which slides, their inputs and ``--settings``. Plain Python, no torch: Snakemake reads it while
building the DAG."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mrplip_core.config_mapping import to_plain
from mrplip_core.use.settings import LocalizeSettings


@dataclass(frozen=True)
class LocalizeJob:
    """One model's localisation job: ``family`` pathflip or mrplip, its run, its ``{model}`` label."""

    family: str
    run: str

    @property
    def label(self) -> str:
        return f"{self.family}-{self.run}"

    @property
    def model_artifact(self) -> str:
        """The layout artifact of the model's export (the job's input)."""
        return "pathflip_model" if self.family == "pathflip" else "model"

    @property
    def run_dir_artifact(self) -> str:
        return "pathflip_dir" if self.family == "pathflip" else "run_dir"


@dataclass(frozen=True)
class LocalizePlan:
    """The ``localize`` section of a (validated) config, resolved: the PathFLIP run (``model``,
    default ``pathflip.run``), the MR-PLIP baseline if any, the slides (default: all) and queries."""

    settings: LocalizeSettings
    jobs: tuple[LocalizeJob, ...]
    slides: tuple[str, ...]
    fatal: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any], slide_ids: Sequence[str]) -> LocalizePlan:
        settings = LocalizeSettings.from_dict(config.get("localize") or {})
        run = settings.model or str((config.get("pathflip") or {}).get("run") or "")
        if not run:
            raise ValueError("localize.model is null and pathflip.run is not set: name the PathFLIP run to localise with")
        jobs = [LocalizeJob("pathflip", run)] + ([LocalizeJob("mrplip", settings.baseline)] if settings.baseline else [])
        # a configured slide that is not in the slide table is localised too: the job records
        # it as failed (unknown slide id) in the summary, and does the others
        slides = tuple(settings.slides) if settings.slides else tuple(slide_ids)
        return cls(settings, tuple(jobs), slides, bool(config.get("failures_fatal", False)))

    @property
    def settings_arg(self) -> str:
        """``--settings`` of ``mrplip localize`` (also the rerun trigger)."""
        return json.dumps({"localize": to_plain(self.settings)}, sort_keys=True)
