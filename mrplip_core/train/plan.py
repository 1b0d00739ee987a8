"""The pretraining stage's plan: every run (``pretrain.run`` and each ``ablations`` entry),
resolved once, with the features it trains on.

``rules/pretrain.smk`` turns this into rules and ``rules/evaluate.smk`` reads each run's
image encoder from it: one resolved section per run, no rule file reading another's globals.
Plain Python, no torch: Snakemake reads it while building the DAG.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mrplip_core.train.ablations import expand_runs


@dataclass(frozen=True)
class RunPlan:
    """One pretraining run: its resolved ``pretrain`` section (the one its job gets and
    writes as ``pretrain/{run}/config.yaml``)."""

    name: str
    section: dict[str, Any]

    @property
    def image_encoder(self) -> str:
        """The image encoder whose features the run trains on (``features/{encoder}/``)."""
        return str(self.section["data"]["image_encoder"])

    @property
    def text_encoder(self) -> str:
        return str(self.section["data"]["text_encoder"])

    @property
    def settings_arg(self) -> str:
        """--settings of ``mrplip pretrain`` (also the rerun trigger: a changed key reruns the run)."""
        return json.dumps({"pretrain": self.section}, sort_keys=True)


@dataclass(frozen=True)
class PretrainPlan:
    """Every pretraining run of a (validated) workflow config, ``main`` first."""

    runs: dict[str, RunPlan]
    main: str
    resources: dict[str, Any]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, results: str,
                    check: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> PretrainPlan:
        """Runs of ``config``: each one's pretrain section pointed at ``results`` and at the
        feature encoders of the ``features`` section (the features stage makes those).

        ``check(section)`` types, fills and validates each ablation's expanded section (e.g.
        against the schema's pretrain section) and returns it; its ValueError is re-raised
        naming the ablation entry. The main section was validated with the whole config.
        """
        pretrain = config["pretrain"]
        features = config.get("features") or {}
        runs: dict[str, RunPlan] = {}
        for name, changes in (config.get("ablations") or {}).items():
            fixed = sorted(set((changes or {}).get("data") or {}) & {"image_encoder", "text_encoder", "results"})
            if fixed:
                raise ValueError(f"config ablations.{name}: data.{fixed[0]} cannot be changed: every run trains "
                                 "on the features stage's encoders (features.image_encoder, features.text_encoder)")
        for i, (name, section) in enumerate(expand_runs(pretrain, config.get("ablations")).items()):
            if check is not None and i > 0:
                try:
                    section = check(section)
                except ValueError as exc:
                    raise ValueError(f"config ablations.{name}: the pretrain section it makes is invalid: {exc}") from None
            data = {**(section.get("data") or {}), "results": results,
                    "image_encoder": features["image_encoder"], "text_encoder": features["text_encoder"]}
            runs[name] = RunPlan(name, {**section, "data": data})
        return cls(runs, str(pretrain["run"]), dict(pretrain.get("resources") or {}))

    @property
    def ablations(self) -> list[str]:
        return [r for r in self.runs if r != self.main]

    def image_encoder(self, run: str) -> str:
        return self.runs[run].image_encoder

    @property
    def run_encoders(self) -> dict[str, str]:
        """Run name -> the image encoder it trains on (what the evaluation plan needs)."""
        return {name: run.image_encoder for name, run in self.runs.items()}
