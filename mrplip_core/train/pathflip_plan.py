"""The PathFLIP training stage's plan: the run's resolved section, its inputs and resources
(rules/pathflip.smk). Plain Python, no torch: Snakemake reads it while building the DAG."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mrplip_core.pathflip.settings import TRAINING_KEYS


@dataclass(frozen=True)
class PathflipPlan:
    """The PathFLIP run of a (validated) workflow config: its training keys, pointed at the
    workflow's results folder and at the features stage's image encoder."""

    run: str
    section: dict[str, Any]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, results: str) -> PathflipPlan:
        pathflip = config.get("pathflip") or {}
        section = {k: v for k, v in pathflip.items() if k in TRAINING_KEYS}
        data = {**(section.get("data") or {}), "results": results,
                "image_encoder": (config.get("features") or {})["image_encoder"]}
        return cls(str(section["run"]), {**section, "data": data})

    @property
    def image_encoder(self) -> str:
        return str(self.section["data"]["image_encoder"])

    @property
    def resources(self) -> dict[str, Any]:
        return dict(self.section.get("resources") or {})

    @property
    def settings_arg(self) -> str:
        """--settings of ``mrplip pathflip`` (also the rerun trigger: a changed training key
        reruns the run; the sub-captions keys rerun the sub-captions, and so this, by file)."""
        return json.dumps({"pathflip": self.section}, sort_keys=True)
