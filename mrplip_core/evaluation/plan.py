"""Which evaluation jobs a config asks for, and the files each one needs.

``rules/evaluate.smk`` only turns this plan into rules; keeping it here means it is plain
Python, unit-tested without Snakemake, and imports no torch (Snakemake reads it while
building the DAG).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mrplip_core.evaluation.settings import BASELINE_PREFIX, DatasetSpec, EvaluationSettings

DEFAULT_IMAGE_ENCODER = "tiny-vit-random"


@dataclass
class EvaluationPlan:
    """Models x datasets, retrieval per run, and where every input and output lives."""

    settings: EvaluationSettings
    runs: list[str]  # pretrain runs (results/pretrain/{run})
    baselines: list[str]  # frozen image encoders (registry names)
    slide_ids: list[str] = field(default_factory=list)
    run_encoder: Callable[[str], str] = lambda run: DEFAULT_IMAGE_ENCODER  # noqa: E731
    results: str = "results"
    #: Folder that relative paths fall back to when they do not exist in the working
    #: directory: the repository, so the shipped evaluation/prompts/*.json work from any -d.
    bundled_root: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], slide_ids: Sequence[str] = (), *,
                    pretrain_runs: Sequence[str] | None = None,
                    run_encoder: Callable[[str], str] | None = None,
                    bundled_root: str | None = None) -> EvaluationPlan:
        """The plan of a (validated) workflow config.

        Runs: ``evaluation.runs``, else ``pretrain_runs`` (what the pretrain stage defines),
        else ``pretrain.run`` when there is a ``pretrain`` section. Baselines:
        ``evaluation.baselines``, else ``features.image_encoder``. A run's encoder:
        ``run_encoder(run)``, else ``features.image_encoder`` (the pretrain rule trains on
        that encoder's features). A run that turns out to use another encoder is still
        evaluated correctly: ``evaluate`` sees the cached features name another encoder
        and embeds the tiles from their pixels.
        """
        settings = EvaluationSettings.from_dict(config.get("evaluation"))
        features = config.get("features") or {}
        pretrain = config.get("pretrain") or {}
        default_encoder = str(features.get("image_encoder", DEFAULT_IMAGE_ENCODER))
        if settings.runs is not None:
            runs = list(settings.runs)
        elif pretrain_runs is not None:
            runs = list(pretrain_runs)
        else:
            runs = [str(pretrain.get("run", "default"))] if pretrain else []
        baselines = list(settings.baselines) if settings.baselines is not None else [default_encoder]
        clash = sorted({r for r in runs if r.startswith(BASELINE_PREFIX) or r in ("features",)})
        if clash:
            raise ValueError(f"pretrain run names {clash} are reserved by evaluation (frozen-*, features)")
        return cls(settings, runs, baselines, list(slide_ids), run_encoder or (lambda run: default_encoder),
                   bundled_root=bundled_root)

    # -- what is evaluated -------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return [BASELINE_PREFIX + b for b in self.baselines] + self.runs

    @property
    def datasets(self) -> dict[str, DatasetSpec]:
        return {d.name: d for d in self.settings.datasets}

    def encoder_of(self, model: str) -> str:
        return model[len(BASELINE_PREFIX):] if model.startswith(BASELINE_PREFIX) else self.run_encoder(model)

    def available(self, dataset: str) -> bool:
        return os.path.exists(self.datasets[dataset].path)

    def prompts_path(self, dataset: str) -> str | None:
        """The dataset's prompt file: as configured when it exists (relative to the working
        directory), else under ``bundled_root``; else as configured (Snakemake then fails
        before any job starts, naming it)."""
        given = self.datasets[dataset].prompts
        if not given or os.path.isabs(given) or os.path.exists(given) or self.bundled_root is None:
            return given
        bundled = os.path.join(self.bundled_root, given)
        return bundled if os.path.exists(bundled) else given

    # -- files ---------------------------------------------------------------------------------
    def metrics_files(self) -> list[str]:
        """Every metrics.json the stage target needs."""
        out = [f"{self.results}/eval/{m}/{d}/metrics.json" for m in self.models for d in self.datasets]
        if self.settings.retrieval.enabled:
            out += [f"{self.results}/eval/{r}/retrieval/metrics.json" for r in self.runs]
        return out

    def model_export(self, run: str) -> str:
        return f"{self.results}/pretrain/{run}/model.safetensors"

    def tile_features(self, encoder: str, dataset: str) -> str:
        return f"{self.results}/eval/features/{encoder}/{dataset}.h5"

    def dataset_inputs(self, model: str, dataset: str) -> dict[str, str]:
        """Inputs of one (model, dataset) job: tile list, prompts, cached features, model export.

        An optional dataset that is absent gets no tile inputs (the job records it as
        skipped); a required one that is absent stays an input, so Snakemake fails before
        any job starts, naming the path.
        """
        spec = self.datasets[dataset]
        inputs: dict[str, str] = {}
        if not spec.optional or self.available(dataset):
            inputs["tiles"] = spec.path
            inputs["features"] = self.tile_features(self.encoder_of(model), dataset)
        if spec.prompts:
            inputs["prompts"] = self.prompts_path(dataset)
        if not model.startswith(BASELINE_PREFIX):
            inputs["model"] = self.model_export(model)
        return inputs

    def retrieval_inputs(self, run: str) -> dict[str, list[str] | str]:
        """The run's export, and captions and image features of every slide (the held-out
        ones are known only from the run's bag index, written when it trains)."""
        encoder = self.run_encoder(run)
        return {
            "model": self.model_export(run),
            "captions": [f"{self.results}/captions/{s}.parquet" for s in self.slide_ids],
            "features": [f"{self.results}/features/{encoder}/{s}.h5" for s in self.slide_ids],
        }

    def report_inputs(self) -> dict[str, list[str] | str]:
        r = self.results
        return {
            "summary": f"{r}/eval/summary.csv",
            "slides": f"{r}/slides.parquet",
            "qc": [f"{r}/tissue/{s}.png" for s in self.slide_ids],
            "captions": [f"{r}/captions/{s}.parquet" for s in self.slide_ids],
            "keywords": [f"{r}/keywords/{s}.parquet" for s in self.slide_ids],
            "runs": [self.model_export(run) for run in self.runs],
        }

    # -- rerun triggers -----------------------------------------------------------------------
    def tile_features_trigger(self, dataset: str) -> str:
        """What changes a tile set's frozen features: where the tiles are, their resolution and
        how they are embedded (device, precision). Not the probes' settings or titles: tuning
        those must not recompute the (possibly GPU) feature pass."""
        spec = self.settings.to_dict()["datasets"][dataset]
        emb = self.settings.embedding
        return json.dumps({"dataset": {k: spec[k] for k in ("path", "mpp", "magnification")},
                           "embedding": {"device": emb.device, "precision": emb.precision}}, sort_keys=True)

    def dataset_trigger(self, dataset: str) -> str:
        """What changes a tile-set result: the dataset's tiles and prompts and the task settings
        (not its title or citation, which only the report shows)."""
        spec = self.settings.to_dict()["datasets"][dataset]
        return json.dumps({"dataset": {k: v for k, v in spec.items() if k not in ("title", "citation")},
                           "tasks": self.settings.digest("zero_shot", "linear_probe", "few_shot", "embedding")},
                          sort_keys=True)


def alternatives(names: Sequence[str], empty: str) -> str:
    """A wildcard regex matching exactly ``names`` (``empty`` when there are none)."""
    return "|".join(map(re.escape, names)) or empty
