"""MR-PLIP pretraining: the MR-PLIP family of the shared training loop (:mod:`mrplip_core.train.loop`).

What is MR-PLIP's here: the bag index of the run, the bag datasets, the model and its six-term
loss, MRTVA's per-pair metrics, SyncBatchNorm for MRTVA's predictor, and the export. The loop
(DDP, precision, accumulation, checkpoints and exact resume) is shared with PathFLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from mrplip_core.data import BagDataset, BagCollator, build_bag_index
from mrplip_core.io.atomic import write_parquet
from mrplip_core.layout import Layout
from mrplip_core.losses import TERMS, MRPLIPLoss
from mrplip_core.model import ModelDims, MRPLIPModel, build_text_encoder, load_tokenizer, save_export
from mrplip_core.model.export import TOKENIZER
from mrplip_core.train.config import RESUMABLE_CHANGES, PretrainConfig, write_config
from mrplip_core.train.distributed import DistInfo, barrier
from mrplip_core.train.loop import Built, TrainingFamily, step_seed, train
from mrplip_core.train.objective import MRPLIPObjective
from mrplip_core.train.summary import RUN_CONFIG_FILE, upgrade_saved_config

__all__ = ["Components", "MRPLIPFamily", "build_components", "default_run_dir", "pretrain", "step_seed"]

BAG_INDEX = "bag_index.parquet"


@dataclass
class Components:
    """Everything a run is built from (also used by bench/pretrain.py)."""

    objective: MRPLIPObjective
    train_set: BagDataset
    val_set: BagDataset | None
    tokenizer: Any
    dims: ModelDims


def default_run_dir(config: PretrainConfig) -> Path:
    return Layout(config.data.results).run_dir(config.run)


def build_components(config: PretrainConfig, index: pd.DataFrame) -> Components:
    """Datasets, tokenizer, model and loss (seeded: identical on every rank)."""
    tokenizer = load_tokenizer(config.model.text_encoder, config.model.tokenizer)
    train_index = index[index["split"] == "train"].reset_index(drop=True)
    val_index = index[index["split"] == "val"].reset_index(drop=True)
    text = {"mlm": config.loss["mlm"], "plm": config.loss["plm"]}  # caption corruption, drawn per item
    train_set = BagDataset(train_index, config.data, tokenizer, seed=config.seed, **text)
    val_set = BagDataset(val_index, config.data, tokenizer, seed=config.seed + 1, **text) if len(val_index) else None
    image_dim, keyword_dim = train_set.feature_dims()
    dims = ModelDims(image_dim, keyword_dim, config.data.magnifications, int(len(tokenizer)))
    torch.manual_seed(config.seed)
    text = build_text_encoder(config.model.text_encoder, config.model.text_config, vocab_size=dims.vocab_size)
    active = [t for t in TERMS if t in config.active_terms]
    model = MRPLIPModel(config.model, dims, text, heads=active, keyword_top_k=config.keyword_top_k,
                        text_pooling=config.model.text_pooling)
    width = model.width
    loss = MRPLIPLoss.from_config(config.loss, fusion_dim=width, representation_dim=width)
    objective = MRPLIPObjective(model, loss, log_pair_types=config.train.log_pair_types)
    return Components(objective, train_set, val_set, tokenizer, dims)


def _pair_keys(magnifications: tuple[float, ...]) -> list[str]:
    return [f"mrtva/{a:g}x-{b:g}x" for i, a in enumerate(magnifications) for b in magnifications[i + 1 :]]


def _check_resume(config: PretrainConfig, state: dict[str, Any], path: Path) -> None:
    changed = config.changed_keys(PretrainConfig.from_dict(upgrade_saved_config(state["config"])), RESUMABLE_CHANGES)
    if changed:
        raise ValueError(
            f"cannot resume {path}: the config changed in {changed} (only {list(RESUMABLE_CHANGES)} may change); "
            "use a new pretrain.run name or train.resume: never"
        )


class MRPLIPFamily(TrainingFamily):
    """MR-PLIP's side of the training loop."""

    name = "pretrain"
    items = "bags"
    stale_files = (BAG_INDEX,)
    config: PretrainConfig

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__(config)
        self.index: pd.DataFrame | None = None
        self.parts: Components | None = None

    def prepare(self, run_dir: Path, info: DistInfo, resuming: bool) -> None:
        """The bag index of the run: built by rank 0 when the run starts, reused when it resumes
        (so slides added to results/ meanwhile cannot shift the data order)."""
        path = run_dir / BAG_INDEX
        if info.is_main and not (resuming and path.exists()):
            d = self.config.data
            index = build_bag_index(d.paths(), d.magnifications, val_fraction=d.val_fraction, split_seed=d.split_seed)
            if not len(index) or not (index["split"] == "train").any():
                raise ValueError(f"no training bags found under {d.results} (encoder {d.image_encoder!r})")
            write_parquet(index, path)
        barrier(info)
        self.index = pd.read_parquet(path)

    def build(self, info: DistInfo) -> Built:
        config = self.config
        assert self.index is not None
        self.parts = parts = build_components(config, self.index)
        objective: nn.Module = parts.objective
        sync_bn = config.train.sync_batchnorm == "always" or (
            config.train.sync_batchnorm == "auto" and info.distributed and info.device.type == "cuda")
        if sync_bn:
            objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        extra = _pair_keys(config.data.magnifications) if "mrtva" in config.active_terms and config.train.log_pair_types else []
        return Built(objective=objective, train_set=parts.train_set, val_set=parts.val_set,
                     collate=BagCollator(parts.train_set.token_info.pad_token_id),
                     groups=parts.train_set.slide_numbers(), window=config.data.shuffle_window,
                     find_unused_parameters=config.active_terms != set(TERMS), extra_metric_keys=extra)

    def write_run_files(self, run_dir: Path) -> None:
        assert self.parts is not None
        write_config(self.config, run_dir / RUN_CONFIG_FILE)
        self.parts.tokenizer.save_pretrained(str(run_dir / TOKENIZER))

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        _check_resume(self.config, state, path)

    def log_line(self, values: dict[str, float]) -> str:
        return " ".join(f"{t} {values[t]:.3f}" for t in TERMS if t in values)

    def export(self, run_dir: Path, objective: nn.Module, step: int) -> None:
        config = self.config
        itc = objective.loss.terms["itc"] if objective.loss.is_active("itc") else None
        save_export(run_dir, objective.model, itc_temperature=itc.logit_scale.temperature if itc is not None else None,
                    extra={"run": config.run, "steps": step, "max_caption_tokens": config.data.max_caption_tokens,
                           "fingerprint": config.fingerprint()})


def pretrain(config: PretrainConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) MR-PLIP pretraining; returns a summary. Call once per process (torchrun)."""
    summary = train(MRPLIPFamily(config), Path(run_dir) if run_dir else default_run_dir(config))
    summary["bags_per_step"] = summary["items_per_step"]
    summary["pairs_per_step"] = summary["items_per_step"] * config.data.patches_per_bag
    return summary
