"""The training keys of the ``pathflip`` config section, typed.

The ``pathflip:`` section holds the sub-captions stage's keys (captions, max_caption_chars,
subcaptions; :class:`mrplip_core.pathflip.settings.PathflipSettings`) and the training run's:
``run``, ``seed``, ``data``, ``model``, ``loss``, ``optim``, ``train``, ``resources``. The
last three are the same settings as MR-PLIP's (one trainer for both). Defaults live in
workflow/schemas/config.schema.yaml (``properties.pathflip``); the dataclasses mirror them
(tests/test_config_defaults.py). The resolved section is written next to the checkpoints as
``results/pathflip/{run}/config.yaml``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mrplip_core.config_mapping import from_mapping
from mrplip_core.config_schema import check_section, section_schema
from mrplip_core.encoders.catalog import DEFAULT_IMAGE_ENCODER
from mrplip_core.losses.pathflip import PATHFLIP_LOSS_DEFAULTS, PATHFLIP_TERMS, PathFLIPLoss
from mrplip_core.pathflip.settings import TRAINING_KEYS
from mrplip_core.pathflip_model.settings import PathflipModelSettings
from mrplip_core.train.config import OptimSettings, ResourceSettings, RunConfig, TrainSettings, deep_merge

PATCH_SOURCES = ("features",)


@dataclass(frozen=True)
class PathflipDataSettings:
    """Which patches and texts a PathFLIP step sees (section ``pathflip.data``)."""

    results: str = "results"  # the workflow's results folder
    image_encoder: str = DEFAULT_IMAGE_ENCODER  # results/features/{image_encoder}/{slide}.h5
    magnifications: tuple[float, ...] = (20.0,)  # x; one: the published form; several: multi-magnification
    patches_per_slide: int = 256  # patches drawn per slide per step (bounded memory; real: 4096)
    subcaptions_per_slide: int = 8  # K sub-captions per slide per step (the paper's K)
    max_caption_tokens: int = 256  # whole caption (L_slide)
    max_subcaption_tokens: int = 64  # each sub-caption (L_region)
    patch_source: str = "features"  # features: the frozen encoder's patch features
    val_fraction: float = 0.0  # share of slides held out, split by slide (the benchmark holds out 0.25)
    split_seed: int = 0
    batch_size: int = 2  # slides per rank per micro-step (real: 64)
    num_workers: int = 0  # DataLoader worker processes per rank
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        mags = [float(m) for m in self.magnifications]
        if not mags or mags != sorted(set(mags)) or mags[0] <= 0:
            raise ValueError(f"pathflip.data.magnifications must be positive and increasing, got {mags}")
        if min(self.patches_per_slide, self.subcaptions_per_slide, self.batch_size) < 1:
            raise ValueError("pathflip.data: patches_per_slide, subcaptions_per_slide and batch_size must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"pathflip.data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patch_source not in PATCH_SOURCES:
            raise ValueError(f"pathflip.data.patch_source must be one of {list(PATCH_SOURCES)}, got {self.patch_source!r}")
        object.__setattr__(self, "magnifications", tuple(mags))


@dataclass(frozen=True)
class PathflipTrainConfig(RunConfig):
    """The resolved training keys of the ``pathflip`` section."""

    run: str = "demo"  # results/pathflip/{run}/
    seed: int = 0
    data: PathflipDataSettings = field(default_factory=PathflipDataSettings)
    model: PathflipModelSettings = field(default_factory=PathflipModelSettings)
    loss: Mapping[str, Any] = field(default_factory=dict)  # PathFLIPLoss.from_config section
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> PathflipTrainConfig:
        """From the training keys (other keys of the ``pathflip`` section are ignored)."""
        values = {k: v for k, v in dict(values or {}).items() if k in TRAINING_KEYS}
        return cls(
            run=str(values.get("run", cls.run)),
            seed=int(values.get("seed", cls.seed)),
            data=from_mapping(PathflipDataSettings, values.get("data"), "pathflip.data"),
            model=from_mapping(PathflipModelSettings, values.get("model"), "pathflip.model"),
            loss=resolve_pathflip_loss(values.get("loss")),
            optim=from_mapping(OptimSettings, values.get("optim"), "pathflip.optim"),
            train=from_mapping(TrainSettings, values.get("train"), "pathflip.train"),
            resources=from_mapping(ResourceSettings, values.get("resources"), "pathflip.resources"),
        )

    @property
    def active_terms(self) -> set[str]:
        return {t for t in PATHFLIP_TERMS if float(self.loss["weights"][t]) > 0}



#: Keys that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES: tuple[str, ...] = (
    "train.stop_at_step", "train.log_every", "train.save_every", "train.keep_last", "train.val_every",
    "train.val_batches", "train.resume", "train.tensorboard", "train.threads", "train.log_pair_types",
    "data.num_workers", "data.prefetch_factor", "data.results", "resources",
)


def resolve_pathflip_loss(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """PATHFLIP_LOSS_DEFAULTS <- ``section``, checked by building the loss."""
    merged = deep_merge(copy.deepcopy(PATHFLIP_LOSS_DEFAULTS), dict(section or {}))
    unknown = sorted(set(merged) - set(PATHFLIP_LOSS_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) in pathflip.loss: {unknown}; known: {sorted(PATHFLIP_LOSS_DEFAULTS)}")
    try:
        PathFLIPLoss.from_config(merged)
    except TypeError as exc:
        raise ValueError(f"pathflip.loss: {exc}") from None
    return merged


def load_pathflip_config(path: str | Path | None = None, settings_json: str | None = None,
                         overrides: Sequence[str] = ()) -> PathflipTrainConfig:
    """Defaults <- ``path`` (a workflow config's ``pathflip:`` section, or a run's config.yaml)
    <- ``settings_json`` (the section as JSON) <- ``KEY=VALUE`` overrides; checked by the schema."""
    from mrplip_core.train.config import parse_overrides

    values: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: expected a mapping, got {type(loaded).__name__}")
        values = dict(loaded.get("pathflip") or {})
        encoder = (loaded.get("features") or {}).get("image_encoder")
        if encoder and "image_encoder" not in (values.get("data") or {}):
            values["data"] = {**(values.get("data") or {}), "image_encoder": encoder}
    if settings_json:
        values = deep_merge(values, json.loads(settings_json))
    values = deep_merge(values, parse_overrides(overrides))
    return PathflipTrainConfig.from_dict(check_section(values, section_schema("pathflip"), "pathflip"))


def write_pathflip_config(config: PathflipTrainConfig, path: str | Path) -> None:
    from mrplip_core.io.atomic import write_text

    text = "# Resolved PathFLIP training config of this run (mrplip pathflip); reload with --config.\n"
    write_text(text + yaml.safe_dump({"pathflip": config.to_dict()}, sort_keys=False), path)
