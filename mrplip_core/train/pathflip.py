"""PathFLIP training: its objective and its family of the shared training loop.

A batch holds B slides (see :mod:`mrplip_core.data.slide_texts`): P sampled patch features
each, the whole caption, K sub-captions. One forward pass:

* patch tokens of every slide; the slide embedding (latents cross-attending to the patches);
* L_slide: slide embedding vs. the caption's embedding (global batch);
* L_region: each slide pooled by its own sub-captions (positives) and by one sub-caption of
  every other slide of the global batch (negatives), sigmoid loss
  (:mod:`mrplip_core.losses.pathflip`).

``results/pathflip/{run}/`` gets, besides the loop's files (checkpoints/, metrics.csv),
``slides.parquet`` (every slide: used, with its split, or left out with the reason),
``config.yaml`` (the resolved section), ``tokenizer/`` and the export (model.json,
model.safetensors).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from mrplip_core.data.slide_texts import SlideTextCollator, SlideTextDataset, SlideTextSettings, build_slide_index
from mrplip_core.io.atomic import write_parquet
from mrplip_core.layout import TEMPLATES, Layout
from mrplip_core.losses.pathflip import PATHFLIP_TERMS, PathFLIPLoss
from mrplip_core.model.text import build_text_encoder, load_tokenizer
from mrplip_core.pathflip_model.export import TOKENIZER, save_pathflip
from mrplip_core.pathflip_model.model import PathFLIPModel
from mrplip_core.pathflip_model.settings import PathflipDims
from mrplip_core.train.distributed import DistInfo, barrier
from mrplip_core.train.loop import Built, TrainingFamily, train
from mrplip_core.train.pathflip_config import RESUMABLE_CHANGES, PathflipTrainConfig, write_pathflip_config

log = logging.getLogger("mrplip.pathflip")

RUN_CONFIG = "config.yaml"
SLIDES_TABLE = Path(TEMPLATES["pathflip_slides"]).name  # slides.parquet: used or left out, and why


class PathFLIPObjective(nn.Module):
    """Model + loss in one module (what DDP wraps)."""

    def __init__(self, model: PathFLIPModel, loss: PathFLIPLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        m = self.model
        tokens = m.patch_tokens(batch["features"], batch["level"])
        mask = batch["patch_mask"]
        inputs: dict[str, dict[str, Any]] = {}
        if self.loss.is_active("slide"):
            inputs["slide"] = {"slide": m.slide_embedding(tokens, mask),
                               "caption": m.text_embedding(batch["caption_ids"], batch["caption_mask"])}
        if self.loss.is_active("region"):
            b, k, length = batch["sub_ids"].shape
            sub = m.text_embedding(batch["sub_ids"].reshape(b * k, length), batch["sub_mask"].reshape(b * k, length))
            inputs["region"] = {"pool": lambda queries: m.pool(tokens, mask, queries)[0], "text": sub.reshape(b, k, -1),
                                "valid": batch["sub_valid"], "text_key": batch["sub_keys"]}
        return self.loss(inputs)


class PathFLIPFamily(TrainingFamily):
    """PathFLIP's side of the training loop."""

    name = "pathflip"
    items = "slides"
    config: PathflipTrainConfig

    def __init__(self, config: PathflipTrainConfig) -> None:
        super().__init__(config)
        self.index: pd.DataFrame | None = None
        self.tokenizer: Any = None

    def prepare(self, run_dir: Path, info: DistInfo, resuming: bool) -> None:
        """The run's slide table: made by rank 0 when the run starts, reused when it resumes."""
        path = run_dir / SLIDES_TABLE
        if info.is_main and not (resuming and path.exists()):
            d = self.config.data
            index = build_slide_index(d.results, d.image_encoder, d.magnifications, val_fraction=d.val_fraction,
                                      split_seed=d.split_seed)
            write_parquet(index, path)
            left_out = index[index["status"] != "ok"]
            for rec in left_out.itertuples(index=False):
                log.warning("slide %s left out of PathFLIP: %s (%s)", rec.slide_id, rec.status, rec.reason)
        barrier(info)
        index = pd.read_parquet(path)
        train_rows = index[(index["status"] == "ok") & (index["split"] == "train")]
        if len(train_rows) < 2:
            raise ValueError(
                f"PathFLIP run {self.config.run!r}: {len(train_rows)} training slide(s) with caption, sub-captions and "
                f"features ({int((index['status'] == 'ok').sum())} usable of {len(index)}; see {path}); contrastive "
                "training needs at least 2")
        self.index = index

    def datasets(self) -> tuple[SlideTextDataset, SlideTextDataset | None, SlideTextSettings]:
        d = self.config.data
        assert self.index is not None
        settings = SlideTextSettings(d.patches_per_slide, d.subcaptions_per_slide, d.max_caption_tokens, d.max_subcaption_tokens)
        ok = self.index[self.index["status"] == "ok"]
        train_set = SlideTextDataset(ok[ok["split"] == "train"], d.results, d.image_encoder, d.magnifications,
                                     self.tokenizer, settings, self.config.seed)
        val_rows = ok[ok["split"] == "val"]
        val_set = SlideTextDataset(val_rows, d.results, d.image_encoder, d.magnifications, self.tokenizer, settings,
                                   self.config.seed + 1) if len(val_rows) >= self.batch_size else None
        return train_set, val_set, settings

    def build(self, info: DistInfo) -> Built:
        c = self.config
        self.tokenizer = load_tokenizer(c.model.text_encoder, c.model.tokenizer)
        train_set, val_set, settings = self.datasets()
        dims = PathflipDims(train_set.feature_dim(), c.data.magnifications, int(len(self.tokenizer)))
        torch.manual_seed(c.seed)
        text = build_text_encoder(c.model.text_encoder, c.model.text_config, vocab_size=dims.vocab_size)
        model = PathFLIPModel(c.model, dims, text)
        objective = PathFLIPObjective(model, PathFLIPLoss.from_config(c.loss))
        frozen_text = c.model.text_trainable_layers is not None
        return Built(objective=objective, train_set=train_set, val_set=val_set,
                     collate=SlideTextCollator(self.tokenizer, settings),
                     find_unused_parameters=frozen_text or c.active_terms != set(PATHFLIP_TERMS))

    def write_run_files(self, run_dir: Path) -> None:
        write_pathflip_config(self.config, run_dir / RUN_CONFIG)
        self.tokenizer.save_pretrained(str(run_dir / TOKENIZER))

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        changed = self.config.changed_keys(PathflipTrainConfig.from_dict(state["config"]), RESUMABLE_CHANGES)
        if changed:
            raise ValueError(f"cannot resume {path}: the config changed in {changed}; use a new pathflip.run name "
                             "or pathflip.train.resume: never")

    def log_line(self, values: dict[str, float]) -> str:
        return " ".join(f"{t} {values[t]:.3f}" for t in PATHFLIP_TERMS if t in values)

    def export(self, run_dir: Path, objective: nn.Module, step: int) -> None:
        c = self.config
        slide = objective.loss.terms["slide"] if objective.loss.is_active("slide") else None
        save_pathflip(run_dir, objective.model, extra={
            "run": c.run, "steps": step, "fingerprint": c.fingerprint(), "image_encoder": c.data.image_encoder,
            "max_caption_tokens": c.data.max_caption_tokens, "max_subcaption_tokens": c.data.max_subcaption_tokens,
            "slide_temperature": slide.logit_scale.temperature if slide is not None else None})


def train_pathflip(config: PathflipTrainConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) PathFLIP training; returns a summary. Call once per process (torchrun)."""
    return train(PathFLIPFamily(config), Path(run_dir) if run_dir else Layout(config.data.results).pathflip_dir(config.run))
