"""Where every stage's result files live: the one definition of the artifact contract.

Each artifact has a name and a template below the results folder; ``{slide}``, ``{encoder}``,
``{run}``, ``{model}``, ``{dataset}``, ``{query}`` and ``{shard}`` are its wildcards. A ``*_shard`` artifact is
the marker a shard job (``slides_per_job`` > 1) writes once all its slides are done: later
stages and cohort-level jobs wait for those markers instead of 20,000 per-slide files, which
keeps the plan of a cohort small (bench/README.md). The library asks for a
:class:`~pathlib.Path` (``Layout("results").tiles("S1")``); the Snakemake rules ask for a
pattern (``LAYOUT.pattern("tiles")`` -> ``"results/tiles/{slide}.parquet"``) or a list
(``LAYOUT.expand("tiles", slide=ids)``). Both come from :data:`TEMPLATES`, so a result path is
written in exactly one place; ``tests/test_layout.py`` checks that rules/ and the library build
none by hand.

This module imports nothing of the project: every layer may use it.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: The results folder of a workflow run, relative to its working directory.
RESULTS = "results"

#: Artifact name -> path template below the results folder.
TEMPLATES: dict[str, str] = {
    # tiles stage (rules/tiles.smk)
    "slides_table": "slides.parquet",  # one row per slide of the table (status, error, mpp, ...)
    "slide_record": "slides/{slide}.json",  # the tiles job's record of one slide
    "slide_records": "slides",  # the folder of those records
    "tiles": "tiles/{slide}.parquet",  # the patch manifest (level-0 px boxes, magnification)
    "tissue_geojson": "tissue/{slide}.geojson",  # tissue polygons, level-0 px (QuPath)
    "tissue_qc": "tissue/{slide}.png",  # QC thumbnail: tissue outline, chosen parents
    "tiles_shard": "tiles/.shards/shard_{shard}.json",  # a shard job's slides, written when all are done
    # captions stage (rules/captions.smk)
    "captions": "captions/{slide}.parquet",
    "keywords": "keywords/{slide}.parquet",
    "captions_shard": "captions/.shards/shard_{shard}.json",
    "keywords_shard": "keywords/.shards/shard_{shard}.json",
    # features stage (rules/features.smk)
    "image_features": "features/{encoder}/{slide}.h5",
    "image_features_dir": "features/{encoder}",
    "image_features_parts": "features/{encoder}/.parts",  # finished slides of a shard job, by settings
    "text_features": "text_features/{encoder}/{slide}.h5",
    "image_features_shard": "features/{encoder}/.shards/shard_{shard}.json",
    "text_features_shard": "text_features/{encoder}/.shards/shard_{shard}.json",
    # PathFLIP sub-captions (rules/subcaptions.smk)
    "slide_captions": "slide_captions.parquet",  # a caption, or why there is none, per slide
    "subcaptions": "subcaptions/{slide}.parquet",  # region-level sub-captions: text and char span
    "subcaptions_shard": "subcaptions/.shards/shard_{shard}.json",
    "pathflip_dir": "pathflip/{run}",  # a PathFLIP training run
    "pathflip_model": "pathflip/{run}/model.safetensors",  # its exported model, written last
    "pathflip_slides": "pathflip/{run}/slides.parquet",  # every slide: used (split) or left out (reason)
    # pretraining stage (rules/pretrain.smk)
    "run_dir": "pretrain/{run}",
    "model": "pretrain/{run}/model.safetensors",  # the exported model, written last
    "model_json": "pretrain/{run}/model.json",
    "run_config": "pretrain/{run}/config.yaml",  # the run's resolved pretrain section
    "run_metrics": "pretrain/{run}/metrics.csv",
    # evaluation stage (rules/evaluate.smk)
    "eval_dir": "eval",
    "eval_tile_features": "eval/features/{encoder}/{dataset}.h5",
    "eval_result_dir": "eval/{model}/{dataset}",
    "eval_metrics": "eval/{model}/{dataset}/metrics.json",
    "eval_summary": "eval/summary.csv",
    "report_dir": "report",
    "report": "report/index.html",
    # using the models: text-to-region localisation (rules/localize.smk); {model} is
    # "{family}-{run}" (pathflip-demo, mrplip-demo), {query} a file-safe key of the query text
    "localize_dir": "localize/{model}",
    "localize_summary": "localize/{model}/summary.parquet",  # a row per (slide, query): status, files, error
    "localize_scores": "localize/{model}/{slide}/{query}.parquet",  # per patch: level-0 box, score
    "localize_heatmap": "localize/{model}/{slide}/{query}.png",  # over the slide's thumbnail
    "localize_geojson": "localize/{model}/{slide}/{query}.geojson",  # top region, level-0 px (QuPath)
}

#: The dataset name under which a run's retrieval result is stored (``eval/{model}/retrieval``).
RETRIEVAL = "retrieval"


def wildcards_of(name: str) -> list[str]:
    """The wildcards of artifact ``name``'s template, in order."""
    return [f for _, f, _, _ in string.Formatter().parse(TEMPLATES[name]) if f]


class _Keep(dict):
    """format_map helper: a wildcard without a value stays ``{name}``."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


@dataclass(frozen=True)
class Layout:
    """The result files below one results folder (``root``, default ``results``)."""

    root: Path = Path(RESULTS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- generic access ------------------------------------------------------------------------
    def path(self, name: str, **wildcards: str) -> Path:
        """The file of artifact ``name`` with every wildcard given (KeyError names a missing one)."""
        missing = [w for w in wildcards_of(name) if w not in wildcards]
        if missing:
            raise KeyError(f"layout: artifact {name!r} needs {missing}")
        return self.root / TEMPLATES[name].format(**wildcards)

    def pattern(self, name: str, **fixed: str) -> str:
        """A Snakemake pattern: ``fixed`` wildcards filled, the others left as ``{wildcard}``."""
        if name not in TEMPLATES:
            raise KeyError(f"layout: no artifact {name!r}; known: {sorted(TEMPLATES)}")
        return os.path.join(str(self.root), TEMPLATES[name].format_map(_Keep(fixed)))

    def expand(self, name: str, **values: str | Iterable[str]) -> list[str]:
        """Every file of ``name`` over the product of ``values`` (like Snakemake's ``expand``)."""
        import itertools

        keys = list(values)
        lists = [[v] if isinstance(v, str) else list(v) for v in values.values()]
        return [str(self.path(name, **dict(zip(keys, combo)))) for combo in itertools.product(*lists)]

    # -- typed shortcuts for the library -------------------------------------------------------
    @property
    def slides_table(self) -> Path:
        return self.path("slides_table")

    @property
    def slide_records(self) -> Path:
        return self.path("slide_records")

    def slide_record(self, slide: str) -> Path:
        return self.path("slide_record", slide=slide)

    def tiles(self, slide: str) -> Path:
        return self.path("tiles", slide=slide)

    def tissue_geojson(self, slide: str) -> Path:
        return self.path("tissue_geojson", slide=slide)

    def tissue_qc(self, slide: str) -> Path:
        return self.path("tissue_qc", slide=slide)

    def captions(self, slide: str) -> Path:
        return self.path("captions", slide=slide)

    def keywords(self, slide: str) -> Path:
        return self.path("keywords", slide=slide)

    def image_features(self, encoder: str, slide: str) -> Path:
        return self.path("image_features", encoder=encoder, slide=slide)

    def image_features_dir(self, encoder: str) -> Path:
        return self.path("image_features_dir", encoder=encoder)

    def image_features_parts(self, encoder: str) -> Path:
        return self.path("image_features_parts", encoder=encoder)

    def text_features(self, encoder: str, slide: str) -> Path:
        return self.path("text_features", encoder=encoder, slide=slide)

    @property
    def slide_captions(self) -> Path:
        return self.path("slide_captions")

    def subcaptions(self, slide: str) -> Path:
        return self.path("subcaptions", slide=slide)

    def pathflip_dir(self, run: str) -> Path:
        return self.path("pathflip_dir", run=run)

    def pathflip_model(self, run: str) -> Path:
        return self.path("pathflip_model", run=run)

    def pathflip_slides(self, run: str) -> Path:
        return self.path("pathflip_slides", run=run)

    def run_dir(self, run: str) -> Path:
        return self.path("run_dir", run=run)

    def model(self, run: str) -> Path:
        return self.path("model", run=run)

    def run_config(self, run: str) -> Path:
        return self.path("run_config", run=run)

    def run_metrics(self, run: str) -> Path:
        return self.path("run_metrics", run=run)

    @property
    def eval_dir(self) -> Path:
        return self.path("eval_dir")

    def eval_tile_features(self, encoder: str, dataset: str) -> Path:
        return self.path("eval_tile_features", encoder=encoder, dataset=dataset)

    def eval_result_dir(self, model: str, dataset: str) -> Path:
        return self.path("eval_result_dir", model=model, dataset=dataset)

    def eval_metrics(self, model: str, dataset: str) -> Path:
        return self.path("eval_metrics", model=model, dataset=dataset)

    def retrieval_metrics(self, model: str) -> Path:
        return self.eval_metrics(model, RETRIEVAL)

    @property
    def eval_summary(self) -> Path:
        return self.path("eval_summary")

    @property
    def report_dir(self) -> Path:
        return self.path("report_dir")

    @property
    def report(self) -> Path:
        return self.path("report")

    def localize_dir(self, model: str) -> Path:
        return self.path("localize_dir", model=model)

    def localize_summary(self, model: str) -> Path:
        return self.path("localize_summary", model=model)

    def localize_scores(self, model: str, slide: str, query: str) -> Path:
        return self.path("localize_scores", model=model, slide=slide, query=query)

    def localize_heatmap(self, model: str, slide: str, query: str) -> Path:
        return self.path("localize_heatmap", model=model, slide=slide, query=query)

    def localize_geojson(self, model: str, slide: str, query: str) -> Path:
        return self.path("localize_geojson", model=model, slide=slide, query=query)
