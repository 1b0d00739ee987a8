"""The captions stage's plan: settings, rerun triggers, job unit and resources.

``rules/captions.smk`` only turns this into rules (captions, then keywords). Plain Python,
no torch: Snakemake reads it while building the DAG.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mrplip_core.captions.settings import CaptionSettings
from mrplip_core.jobs import JobUnit, settings_json

SECTIONS = ("captions",)


@dataclass(frozen=True)
class CaptionsPlan(JobUnit):
    """Captions and keywords jobs of a (validated) workflow config."""

    settings: CaptionSettings
    settings_arg: str  # --settings of `mrplip captions` and `mrplip keywords`
    keywords_trigger: str  # what changes a keyword: the ``captions.keywords`` section

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CaptionsPlan:
        section = config.get("captions") or {}
        return cls(CaptionSettings.from_dict(section), settings_json(config, *SECTIONS),
                   json.dumps(section.get("keywords"), sort_keys=True))

    @property
    def trigger(self) -> str:
        """What changes a caption (CaptionSettings.digest): not concurrency, threads or the job unit."""
        return self.settings.digest()

    @property
    def slides_per_job(self) -> int:
        return self.settings.slides_per_job
