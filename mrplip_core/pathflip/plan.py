"""The sub-captions stage's plan: settings, rerun triggers and job unit (rules/subcaptions.smk).

Plain Python, no torch: Snakemake reads it while building the DAG.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mrplip_core.jobs import JobUnit, settings_json
from mrplip_core.pathflip.settings import PathflipSettings

SECTIONS = ("pathflip",)


@dataclass(frozen=True)
class SubcaptionsPlan(JobUnit):
    """The slide-captions table job and the sub-captions jobs of a (validated) workflow config."""

    settings: PathflipSettings
    settings_arg: str  # --settings of `mrplip slide-captions` and `mrplip subcaptions`

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SubcaptionsPlan:
        return cls(PathflipSettings.from_dict(config.get("pathflip")), settings_json(config, *SECTIONS))

    @property
    def captions_trigger(self) -> str:
        """What changes the slide-captions table (besides the slide table and caption file)."""
        return json.dumps({"captions": self.settings.captions, "max_caption_chars": self.settings.max_caption_chars})

    @property
    def subcaptions_trigger(self) -> str:
        """What changes a sub-caption: the splitter's settings, not the job unit."""
        s = self.settings.subcaptions
        return json.dumps({"method": s.method, "split_clauses": s.split_clauses, "min_words": s.min_words})

    @property
    def slides_per_job(self) -> int:
        return self.settings.subcaptions.slides_per_job
