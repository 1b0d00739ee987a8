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
        """What changes a sub-caption: the splitter's settings, not the job unit; with ``method:
        llm`` also the model, prompt, schema and generation settings and the endpoint (not the
        server command, concurrency, timeouts or the job's resources)."""
        s = self.settings.subcaptions
        trigger: dict[str, Any] = {"method": s.method, "split_clauses": s.split_clauses, "min_words": s.min_words}
        if s.method == "llm":
            m = s.llm
            trigger["llm"] = {"model": m.model, "prompt": m.prompt, "structured_output": m.structured_output,
                              "max_findings": m.max_findings, "max_finding_chars": m.max_finding_chars,
                              "max_tokens": m.max_tokens, "temperature": m.temperature,
                              "base_url": m.openai.base_url, "model_name": m.openai.model_name}
        return json.dumps(trigger)

    @property
    def subcaptions_resources(self) -> dict[str, int]:
        """Resources of a sub-captions job: small for the rules; with ``method: llm`` the
        ``llm`` section's memory, run time (minutes) and GPUs (a server runs inside the job)."""
        s = self.settings.subcaptions
        if s.method != "llm":
            return {"mem_mb": 2000, "runtime": 10, "gpu": 0}
        return {"mem_mb": s.llm.mem_mb, "runtime": s.llm.runtime, "gpu": s.job_gpus}

    @property
    def slides_per_job(self) -> int:
        return self.settings.subcaptions.slides_per_job
