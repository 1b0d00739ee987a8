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
from mrplip_core.layout import RETRIEVAL, Layout

PATHFLIP_PREFIX = "pathflip-"  # slide-level model name of a PathFLIP run
SLIDES = "slides"  # the dataset name of slide-level metrics: eval/{model}/slides/metrics.json


def region_path(value: str, slide_table: str | os.PathLike) -> str:
    """A slide table's region file entry as a path: absolute as given, relative to the table's folder."""
    value = value.strip()
    return value if os.path.isabs(value) else os.path.join(os.path.dirname(os.fspath(slide_table)), value)


@dataclass
class EvaluationPlan:
    """Models x datasets, retrieval per run, and where every input and output lives."""

    settings: EvaluationSettings
    run_encoders: dict[str, str]  # pretrain run (pretrain/{run}) -> the image encoder it trains on
    baselines: list[str]  # frozen image encoders (registry names)
    slide_ids: list[str] = field(default_factory=list)
    layout: Layout = field(default_factory=Layout)
    #: What a cohort-level job waits for of per-slide artifact ``name`` (``**fixed``: e.g. the
    #: encoder): the rules pass their own (each slide's file, or the stage's shard markers);
    #: by default each slide's file.
    slide_files: Callable[..., list[str]] | None = None
    #: Folder that relative paths fall back to when they do not exist in the working
    #: directory: the repository, so the shipped evaluation/prompts/*.json work from any -d.
    bundled_root: str | None = None
    #: PathFLIP runs (pathflip/{run}) -> the image encoder they train on; slide-level evaluation
    #: evaluates each as model ``pathflip-{run}``, with the MR-PLIP runs as its baselines.
    pathflip_runs: dict[str, str] = field(default_factory=dict)
    #: Slide table (its label columns are the slide-level tasks).
    slide_table: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], slide_ids: Sequence[str] = (), *,
                    run_encoders: Mapping[str, str] | None = None, layout: Layout | None = None,
                    bundled_root: str | None = None,
                    slide_files: Callable[..., list[str]] | None = None,
                    pathflip_runs: Mapping[str, str] | None = None) -> EvaluationPlan:
        """The plan of a (validated) workflow config.

        ``run_encoders``: every pretraining run of the config and the image encoder it trains
        on, as the pretraining plan resolved them (``PretrainPlan.run_encoders``). Runs
        evaluated: ``evaluation.runs`` when given, else all of those. A run named in
        ``evaluation.runs`` that this config does not train (one trained earlier) must have
        finished: its encoder is read from its own resolved config (``pretrain/{run}/config.yaml``).
        Baselines: ``evaluation.baselines``, else ``features.image_encoder``.
        """
        settings = EvaluationSettings.from_dict(config.get("evaluation"))
        features = config.get("features") or {}
        layout = layout or Layout()
        known = dict(run_encoders or {})
        if settings.runs is not None:
            known = {r: known[r] if r in known else _trained_encoder(layout, r, list(known)) for r in settings.runs}
        baselines = (list(settings.baselines) if settings.baselines is not None
                     else [str(features["image_encoder"])])
        clash = sorted({r for r in known if r.startswith((BASELINE_PREFIX, PATHFLIP_PREFIX)) or r in ("features",)})
        if clash:
            raise ValueError(f"pretrain run names {clash} are reserved by evaluation (frozen-*, pathflip-*, features)")
        return cls(settings, known, baselines, list(slide_ids), layout, slide_files, bundled_root=bundled_root,
                   pathflip_runs=dict(pathflip_runs or {}), slide_table=config.get("slides"))

    @property
    def runs(self) -> list[str]:
        return list(self.run_encoders)

    # -- what is evaluated -------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return [BASELINE_PREFIX + b for b in self.baselines] + self.runs

    @property
    def datasets(self) -> dict[str, DatasetSpec]:
        return {d.name: d for d in self.settings.datasets}

    def encoder_of(self, model: str) -> str:
        return model[len(BASELINE_PREFIX):] if model.startswith(BASELINE_PREFIX) else self.run_encoders[model]

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

    @property
    def slide_models(self) -> list[str]:
        """Models of slide-level evaluation: every PathFLIP run, then the MR-PLIP runs (baselines)."""
        if not self.settings.slides.enabled or not self.pathflip_runs:
            return []
        return [PATHFLIP_PREFIX + r for r in self.pathflip_runs] + self.runs

    # -- files ---------------------------------------------------------------------------------
    def metrics_files(self) -> list[str]:
        """Every metrics.json the stage target needs."""
        out = [str(self.layout.eval_metrics(m, d)) for m in self.models for d in self.datasets]
        if self.settings.retrieval.enabled:
            out += [str(self.layout.eval_metrics(r, RETRIEVAL)) for r in self.runs]
        out += [str(self.layout.eval_metrics(m, SLIDES)) for m in self.slide_models]
        return out

    def slide_eval_inputs(self, model: str) -> dict[str, list[str] | str]:
        """A slide-level job's inputs: the model's export, the slide table, the captions table,
        image features of every slide (the model's encoder) and the PathFLIP run's slide split."""
        if model.startswith(PATHFLIP_PREFIX):
            run = model[len(PATHFLIP_PREFIX):]
            export, encoder = str(self.layout.pathflip_model(run)), self.pathflip_runs[run]
        else:
            export, encoder = self.model_export(model), self.run_encoders[model]
        inputs: dict[str, list[str] | str] = {
            "model": export,
            "captions": str(self.layout.slide_captions),
            "features": self.cohort_files("image_features", encoder=encoder),
            "split": [str(self.layout.pathflip_model(r)) for r in self.pathflip_runs],
        }
        if self.slide_table:
            inputs["table"] = self.slide_table
            inputs["regions"] = self.region_files()
        if self.settings.slides.region_prompts:
            inputs["region_prompts"] = self.settings.slides.region_prompts
        return inputs

    def region_files(self) -> list[str]:
        """The region GeoJSON files the slide table's ``evaluation.slides.regions`` column names
        (relative paths: to the table's folder), so that a changed annotation reruns the job."""
        column = self.settings.slides.regions
        if not column or not self.slide_table:
            return []
        from mrplip_core.wsi.table import read_slide_table

        table = read_slide_table(self.slide_table)
        if column not in table.columns:
            return []
        return [region_path(v, self.slide_table) for v in table[column] if isinstance(v, str) and v.strip()]

    def model_export(self, run: str) -> str:
        return str(self.layout.model(run))

    def tile_features(self, encoder: str, dataset: str) -> str:
        return str(self.layout.eval_tile_features(encoder, dataset))

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
        return {
            "model": self.model_export(run),
            "captions": self.cohort_files("captions"),
            "features": self.cohort_files("image_features", encoder=self.run_encoders[run]),
        }

    def report_inputs(self) -> dict[str, list[str] | str]:
        return {
            "summary": str(self.layout.eval_summary),
            "slides": str(self.layout.slides_table),
            "qc": self.cohort_files("tissue_qc"),
            "captions": self.cohort_files("captions"),
            "keywords": self.cohort_files("keywords"),
            "runs": [self.model_export(run) for run in self.runs],
            "pathflip": [str(self.layout.pathflip_model(r)) for r in self.pathflip_runs],
            "subcaptions": self.cohort_files("subcaptions") if self.pathflip_runs else [],
        }

    def cohort_files(self, name: str, **fixed: str) -> list[str]:
        """The files a cohort-level job waits for of per-slide artifact ``name``."""
        if self.slide_files is not None:
            return self.slide_files(name, **fixed)
        return self.layout.expand(name, slide=self.slide_ids, **fixed)

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


def _trained_encoder(layout: Layout, run: str, defined: list[str]) -> str:
    """The image encoder of a run trained earlier, from the config it wrote."""
    import yaml

    path = layout.run_config(run)
    if run.startswith(BASELINE_PREFIX) or run == "features":
        raise ValueError(f"pretrain run names ['{run}'] are reserved by evaluation (frozen-*, features)")
    if not path.exists():
        raise ValueError(f"config evaluation.runs: {run!r} is not a pretraining run of this config "
                         f"(it defines {defined}) and has no finished run folder ({path} is missing)")
    loaded = yaml.safe_load(path.read_text()) or {}
    return str(loaded.get("pretrain", loaded)["data"]["image_encoder"])


def alternatives(names: Sequence[str], empty: str) -> str:
    """A wildcard regex matching exactly ``names`` (``empty`` when there are none)."""
    return "|".join(map(re.escape, names)) or empty
