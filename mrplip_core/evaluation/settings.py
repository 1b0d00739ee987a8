"""The ``evaluation:`` section of the config, typed.

Every field's default equals the one proposed for ``workflow/schemas/config.schema.yaml``,
so ``mrplip evaluate`` run by hand behaves like the workflow. Unknown keys are an error
that names them (a typo never silently falls back to a default).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mrplip_core.config_mapping import from_mapping, to_plain

#: Model ids of frozen-encoder baselines are this prefix plus the encoder's registry name.
BASELINE_PREFIX = "frozen-"

#: Folder names under results/eval/ that a dataset may not take.
RESERVED_NAMES = frozenset({"retrieval", "features", "summary.csv"})

Protocol = Literal["auto", "given", "holdout", "kfold"]


@dataclass(frozen=True)
class DatasetSpec:
    """One labelled tile set."""

    name: str  # short key, used in results/eval/{model}/{name}/
    # CSV with columns path,label (optional split: train | test), paths relative to the CSV's
    # folder; or a folder holding one subfolder of images per class (subfolder = label).
    path: str
    mpp: float  # um/px of the tiles; the model magnification is 10 / mpp unless overridden
    magnification: float | None = None  # magnification (x) given to the model; None: 10 / mpp
    prompts: str | None = None  # prompt JSON (class synonyms x templates); None: no zero-shot
    optional: bool = False  # a missing path skips the dataset (noted in the report) instead of failing
    title: str = ""  # human name for the report, e.g. "NCT-CRC-HE-100K (9 classes)"
    citation: str = ""  # attribution shown in the report (CC-BY sets require it)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) or self.name in RESERVED_NAMES:
            raise ValueError(f"evaluation.datasets: {self.name!r} is not a usable name (letters, digits, _ . -; "
                             f"not one of {sorted(RESERVED_NAMES)})")
        if not self.mpp or float(self.mpp) <= 0:
            raise ValueError(f"evaluation.datasets.{self.name}.mpp must be a positive um/px, got {self.mpp!r}")
        if self.magnification is not None and float(self.magnification) <= 0:
            raise ValueError(f"evaluation.datasets.{self.name}.magnification must be positive or null")

    @property
    def model_magnification(self) -> float:
        """Magnification (x) the tiles are presented at: the override, else ``10 / mpp``."""
        return float(self.magnification) if self.magnification else 10.0 / float(self.mpp)


@dataclass(frozen=True)
class ZeroShotSettings:
    enabled: bool = True  # zero-shot classification for models with a text side


@dataclass(frozen=True)
class LinearProbeSettings:
    """Logistic regression on frozen embeddings; C chosen by CV on the training split only."""

    enabled: bool = True
    # auto: "given" when the dataset has a split column, "holdout" when every class has at
    # least min_holdout_per_class tiles, else stratified "kfold" with as many folds as the
    # smallest class allows (pooled out-of-fold predictions; the tiny sample sets).
    protocol: Protocol = "auto"
    test_fraction: float = 0.3  # holdout: share of each class held out for testing
    min_holdout_per_class: int = 10  # auto: smallest class size for which holdout is used
    folds: int = 5  # kfold: outer folds (capped by the smallest class)
    inner_folds: int = 5  # folds of the CV that chooses C (capped by the smallest training class)
    c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)  # inverse regularisation
    default_c: float = 1.0  # C when the training split is too small for any CV (1 tile per class)
    cv_max_samples: int = 20000  # C search on a stratified subsample of this many training tiles at most
    scoring: str = "neg_log_loss"  # sklearn scorer of the C search (a proper score: no ties)
    standardize: bool = True  # z-score features (fitted on the training split) before the regression
    max_iter: int = 2000  # lbfgs iterations
    seed: int = 0  # seed of every split


@dataclass(frozen=True)
class FewShotSettings:
    """k tiles per class for training, several seeds, the rest (or the given test split) for testing."""

    enabled: bool = True
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)  # k per class; a k no class-size allows is reported as skipped
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # one draw of the k-shot training set per seed


@dataclass(frozen=True)
class RetrievalSettings:
    """Image-to-text and text-to-image recall@K on patch/caption pairs of held-out slides."""

    enabled: bool = True
    # val: the slides the run held out from pretraining (its bag_index.parquet split "val");
    # all: every slide with captions (NOT held out: the report says so). The default is the
    # demo's (pretrain.data.val_fraction 0 holds out nothing); real runs: val.
    split: Literal["val", "all"] = "all"
    max_pairs: int = 1000  # pairs drawn (seeded) when there are more; recall depends on this gallery size
    ks: tuple[int, ...] = (1, 5, 10)
    magnifications: tuple[float, ...] | None = None  # only these (x); None: every magnification
    seed: int = 0


@dataclass(frozen=True)
class SlideEvalSettings:
    """Slide-level evaluation (mrplip_core/evaluation/slides.py) of the PathFLIP run and the
    MR-PLIP runs over the pipeline's slides."""

    enabled: bool = True
    # label column of the slide table -> a prompt file (the tile prompt format) or null: the
    # label values themselves in the templates "{name}." and "an H&E slide of {name}."
    labels: Mapping[str, str | None] = field(default_factory=dict)
    magnification: float = 20.0  # MR-PLIP baseline: the patches (x) it embeds per slide
    topk: int = 10  # MR-PLIP baseline: MI-Zero top-k pooling of patch-to-prompt similarity
    ks: tuple[int, ...] = (1, 5, 10)  # caption <-> slide recall@K
    # column of the slide table naming each slide's region GeoJSON (polygons in level-0 px with a
    # `kind`, or QuPath annotations with a classification): localisation AUROC and pointing; null: none
    regions: str | None = None
    # prompt file (the tile format) whose class names are the region kinds: a kind's heatmap is the
    # mean over its prompts; null: the kind's name itself is the query
    region_prompts: str | None = None

    def __post_init__(self) -> None:
        if self.magnification <= 0 or self.topk < 1 or not self.ks or min(self.ks) < 1:
            raise ValueError("evaluation.slides: magnification > 0, topk >= 1 and ks >= 1")
        object.__setattr__(self, "labels", {str(k): (None if v is None else str(v)) for k, v in dict(self.labels or {}).items()})


@dataclass(frozen=True)
class EmbeddingSettings:
    """How tiles run through the frozen image encoder (results/eval/features/)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (encoder's dtype on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    batch_size: int = 128  # tiles per forward pass
    read_threads: int = 4  # threads decoding tile images


@dataclass(frozen=True)
class ReportSettings:
    """What the HTML report shows."""

    max_qc_slides: int = 24  # tissue QC thumbnails shown
    max_slide_rows: int = 200  # rows of the slide table (failed slides are always listed)
    sample_bags: int = 4  # bags shown as parent -> child chains with captions
    thumbnail_px: int = 160  # side of a patch thumbnail in the page
    qc_width_px: int = 360  # width of a tissue QC thumbnail in the page


@dataclass(frozen=True)
class EvaluationSettings:
    """The resolved ``evaluation`` section."""

    baselines: tuple[str, ...] | None = None  # frozen encoders (registry names); None: features.image_encoder
    runs: tuple[str, ...] | None = None  # pretrain runs (results/pretrain/{run}); None: the pretrain stage's
    datasets: tuple[DatasetSpec, ...] = ()
    zero_shot: ZeroShotSettings = field(default_factory=ZeroShotSettings)
    linear_probe: LinearProbeSettings = field(default_factory=LinearProbeSettings)
    few_shot: FewShotSettings = field(default_factory=FewShotSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    slides: SlideEvalSettings = field(default_factory=SlideEvalSettings)
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    threads: int = 2  # cores per evaluation job
    mem_mb: int = 8000  # memory per job
    runtime: int = 120  # minutes per job
    gpu: int = 0  # GPUs per tile-feature job (0: CPU)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> EvaluationSettings:
        """From the config's plain dict (the ``evaluation`` section)."""
        d = dict(d or {})
        nested = {
            "zero_shot": ZeroShotSettings,
            "linear_probe": LinearProbeSettings,
            "few_shot": FewShotSettings,
            "retrieval": RetrievalSettings,
            "slides": SlideEvalSettings,
            "embedding": EmbeddingSettings,
            "report": ReportSettings,
        }
        for key, kind in nested.items():
            d[key] = from_mapping(kind, d.get(key), f"evaluation.{key}")
        datasets = d.get("datasets") or {}
        if not isinstance(datasets, Mapping):
            raise ValueError("evaluation.datasets must be a mapping name -> {path, mpp, ...}")
        d["datasets"] = tuple(
            from_mapping(DatasetSpec, {**dict(v or {}), "name": str(k)}, f"evaluation.datasets.{k}") for k, v in datasets.items()
        )
        for key in ("baselines", "runs"):
            if d.get(key) is not None:
                d[key] = tuple(str(v) for v in d[key])
        return from_mapping(cls, d, "evaluation")

    def dataset(self, name: str) -> DatasetSpec:
        for spec in self.datasets:
            if spec.name == name:
                return spec
        raise KeyError(f"no dataset {name!r} in evaluation.datasets; configured: {[s.name for s in self.datasets]}")

    def to_dict(self) -> dict[str, Any]:
        out = to_plain(self)
        out["datasets"] = {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in out["datasets"]}
        return out

    def digest(self, *sections: str) -> str:
        """Short hash of some sections (a rerun trigger for the rules that read only those)."""
        plain = self.to_dict()
        chosen = {k: plain[k] for k in sections} if sections else plain
        return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


