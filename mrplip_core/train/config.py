"""The ``pretrain`` config section, typed, and how it is resolved.

Resolution (dinov2-style): the config file's ``pretrain:`` section (or a file holding the
section itself) <- a JSON string (what the Snakemake rule passes) <- ``--set
key.sub=value`` overrides, merged once; then the defaults of
workflow/schemas/config.schema.yaml (``properties.pretrain``, the one home of every default)
fill what is missing and it is validated there and here; the result is written next to the
checkpoints as ``results/pretrain/{run}/config.yaml``. The dataclasses' defaults mirror the
schema's (tests/test_config_defaults.py holds them equal): they are the demo's values, with
config.yaml's ``# real:`` comments giving those of a TCGA-scale run.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mrplip_core.config_mapping import from_mapping, to_plain
from mrplip_core.config_schema import check_section, section_schema
from mrplip_core.data.settings import DataSettings
from mrplip_core.losses import DEFAULT_CONFIG as LOSS_DEFAULTS
from mrplip_core.losses import TERMS
from mrplip_core.model.settings import ModelSettings

#: This project's departures from the loss helper's defaults: ITC gathers with gradient
#: and computes local rows, so DDP gives every term exactly its single-process gradient.
LOSS_OVERRIDES: dict[str, Any] = {"itc": {"local_loss": True, "gather_with_grad": True}}


@dataclass(frozen=True)
class OptimSettings:
    """AdamW with linear warmup and cosine decay (per optimizer step)."""

    lr: float = 5e-4  # peak learning rate (real: 1e-4)
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of lr
    warmup_steps: int = 2  # linear warmup from 0 (real: 2000)
    weight_decay: float = 0.05  # not applied to biases, norms, embeddings, temperatures
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    text_encoder_lr_scale: float = 1.0  # lr multiplier of the (pretrained) text encoder

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("pretrain.optim: lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0")


@dataclass(frozen=True)
class TrainSettings:
    """Loop, precision, logging and checkpointing."""

    steps: int = 10  # optimizer steps of the whole run (the schedule's length; real: 50000)
    stop_at_step: int | None = None  # stop early here (checkpoint, no export): time-limited jobs
    accumulation_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # process group: auto (nccl on GPU, gloo on CPU) | nccl | gloo
    threads: int | None = None  # torch intra-op threads per rank; null: torch's default
    log_every: int = 1  # steps between metric rows (metrics.csv, TensorBoard, log)
    save_every: int = 1000  # steps between checkpoints
    keep_last: int = 3  # checkpoints kept (older ones are deleted)
    val_every: int = 0  # steps between validation passes; 0: never
    val_batches: int = 8  # batches per validation pass (the same batches every time)
    resume: str = "auto"  # auto (latest checkpoint of the run, if any) | never | a checkpoint folder
    sync_batchnorm: str = "auto"  # MRTVA BatchNorm across ranks: auto (GPU only) | always | never
    log_pair_types: bool = True  # log MRTVA per magnification pair (one device sync per step)
    compile: bool = False  # torch.compile the model (GPU)
    tensorboard: bool = True  # also log to TensorBoard when it is installed

    def __post_init__(self) -> None:
        if self.steps < 1 or self.accumulation_steps < 1:
            raise ValueError("pretrain.train: steps and accumulation_steps must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"pretrain.train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.sync_batchnorm not in ("auto", "always", "never"):
            raise ValueError("pretrain.train.sync_batchnorm must be auto, always or never")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError("pretrain.train.stop_at_step must be >= 1 or null")

    @property
    def last_step(self) -> int:
        """The step this invocation stops at."""
        return min(self.steps, self.stop_at_step) if self.stop_at_step else self.steps


@dataclass(frozen=True)
class ResourceSettings:
    """What the Snakemake rule asks for, per node (profiles/slurm sets the node count)."""

    processes_per_node: int = 1  # torchrun --nproc-per-node without Slurm (one per GPU; CPU: gloo)
    gpus_per_node: int = 0  # the rule's `gpu` resource (0: a CPU run)
    threads_per_process: int = 2  # OMP threads of each training process
    mem_mb: int = 8000  # memory per node
    runtime: int = 120  # minutes


class RunConfig:
    """What the training loop needs of a resolved run config besides its sections: the plain
    dict (saved with checkpoints), a flat view for resume checks and a fingerprint."""

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def digest(self, ignore: Sequence[str] = ()) -> dict[str, Any]:
        """Flat ``{dotted.key: value}`` view, minus ``ignore`` prefixes (resume checks)."""
        flat = _flatten(self.to_dict())
        return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in ignore)}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def changed_keys(self, saved: RunConfig, resumable: Sequence[str]) -> list[str]:
        """Keys (dotted) whose value differs from ``saved``, other than the ``resumable`` ones."""
        old, new = saved.digest(resumable), self.digest(resumable)
        return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


@dataclass(frozen=True)
class PretrainConfig(RunConfig):
    """The resolved ``pretrain`` section."""

    run: str = "demo"  # run name: results/pretrain/{run}/
    seed: int = 0  # seeds model init, data order and every random draw
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    loss: Mapping[str, Any] = field(default_factory=dict)  # MRPLIPLoss.from_config section
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> PretrainConfig:
        values = dict(values or {})
        known = {"run", "seed", "data", "model", "loss", "optim", "train", "resources"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in pretrain: {unknown}; known: {sorted(known)}")
        loss = resolve_loss(values.get("loss"))
        config = cls(
            run=str(values.get("run", cls.run)),
            seed=int(values.get("seed", cls.seed)),
            data=from_mapping(DataSettings, values.get("data"), "pretrain.data"),
            model=from_mapping(ModelSettings, values.get("model"), "pretrain.model"),
            loss=loss,
            optim=from_mapping(OptimSettings, values.get("optim"), "pretrain.optim"),
            train=from_mapping(TrainSettings, values.get("train"), "pretrain.train"),
            resources=from_mapping(ResourceSettings, values.get("resources"), "pretrain.resources"),
        )
        if config.data.patches_per_bag * config.data.batch_size < 2 and config.active_terms & {"itc", "itm"}:
            raise ValueError("pretrain.data: ITC/ITM need at least 2 patches per rank batch")
        return config

    @property
    def active_terms(self) -> set[str]:
        return {t for t in TERMS if float(self.loss["weights"][t]) > 0}

    @property
    def keyword_top_k(self) -> int:
        return int(self.model.keyword_top_k or self.loss["cvta"].get("k_o", 5))



#: Keys that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES: tuple[str, ...] = (
    "train.stop_at_step", "train.log_every", "train.save_every", "train.keep_last", "train.val_every",
    "train.val_batches", "train.resume", "train.tensorboard", "train.threads", "train.log_pair_types",
    "data.num_workers", "data.prefetch_factor", "data.slide_cache", "data.results", "resources",
)


def resolve_loss(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """LOSS_DEFAULTS <- LOSS_OVERRIDES <- ``section``, checked by building the loss."""
    from mrplip_core.losses import MRPLIPLoss

    merged = deep_merge(deep_merge(copy.deepcopy(LOSS_DEFAULTS), LOSS_OVERRIDES), dict(section or {}))
    unknown = sorted(set(merged) - set(LOSS_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) in pretrain.loss: {unknown}; known: {sorted(LOSS_DEFAULTS)}")
    MRPLIPLoss.from_config(merged, fusion_dim=8, representation_dim=8)  # raises on bad keys / weights
    return merged


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively by ``update`` (mappings merge, other values replace)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.steps=100", "loss.weights.plm=0"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(
    path: str | Path | None = None, settings_json: str | None = None, overrides: Sequence[str] = ()
) -> PretrainConfig:
    """Resolve the config (see the module docstring).

    ``path``: a workflow config (config.yaml: its ``pretrain:`` section; the features it
    trains on default to its ``features:`` encoders, as the Snakemake rule sets them) or a
    file holding the section itself (a run's resolved config.yaml).
    """
    values: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: expected a mapping, got {type(loaded).__name__}")
        values = dict(loaded.get("pretrain") or {}) if "pretrain" in loaded else dict(loaded)
        from mrplip_core.train.summary import upgrade_saved_config

        values = upgrade_saved_config(values)  # a run folder's config.yaml written by an older version
        features = loaded.get("features") or {}
        encoders = {key: features[key] for key in ("image_encoder", "text_encoder") if key in features}
        if encoders:
            values["data"] = {**encoders, **(values.get("data") or {})}
    if settings_json:
        values = deep_merge(values, json.loads(settings_json))
    values = deep_merge(values, parse_overrides(overrides))
    return PretrainConfig.from_dict(check_section(values, section_schema("pretrain"), "pretrain"))


def write_config(config: PretrainConfig, path: str | Path) -> None:
    from mrplip_core.io.atomic import write_text

    text = "# Resolved pretrain config of this run (mrplip pretrain); reload with --config.\n"
    write_text(text + yaml.safe_dump({"pretrain": config.to_dict()}, sort_keys=False), path)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
