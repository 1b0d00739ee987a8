"""MR-PLIP pretraining loop: one process per device, launched by ``torchrun``.

Exactness of resume (bitwise on CPU): the data position is one integer (batches consumed,
see :class:`mrplip_core.data.BagStreamSampler`), every sample's randomness is a function
of ``(seed, epoch, bag)``, and the global RNGs (dropout) and the ITM negative sampler are
reseeded from ``(seed, step, micro-batch, rank)`` before every micro-batch. A checkpoint
holds the weights (safetensors), the optimizer and scheduler states, the data position
and each rank's RNG states, all loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mrplip_core.data import BagDataset, BagStreamSampler, build_bag_index, make_loader
from mrplip_core.data.dataset import item_seed
from mrplip_core.io.atomic import write_parquet
from mrplip_core.layout import Layout
from mrplip_core.losses import TERMS, MRPLIPLoss
from mrplip_core.model import ModelDims, MRPLIPModel, build_text_encoder, load_tokenizer, save_export
from mrplip_core.model.export import TOKENIZER
from mrplip_core.train.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from mrplip_core.train.config import RESUMABLE_CHANGES, PretrainConfig, write_config
from mrplip_core.train.distributed import DistInfo, barrier, init_distributed, shutdown
from mrplip_core.train.metrics import MetricAccumulator, MetricsWriter, metric_keys
from mrplip_core.train.summary import upgrade_saved_config
from mrplip_core.train.objective import MRPLIPObjective
from mrplip_core.train.schedule import build_optimizer, build_scheduler
from mrplip_core.train.summary import RUN_CONFIG_FILE, RUN_METRICS_FILE

log = logging.getLogger("mrplip.pretrain")


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


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return item_seed(seed, 1_000_000 + step, micro * 65_536 + rank)


def _precision(config: PretrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32."""
    wanted = config.train.precision
    if wanted == "auto":
        wanted = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if wanted == "bf16" else None


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _pair_keys(magnifications: tuple[float, ...]) -> list[str]:
    return [f"mrtva/{a:g}x-{b:g}x" for i, a in enumerate(magnifications) for b in magnifications[i + 1 :]]


def _check_resume(config: PretrainConfig, state: dict[str, Any], path: Path) -> None:
    saved = PretrainConfig.from_dict(upgrade_saved_config(state["config"]))
    old, new = saved.digest(RESUMABLE_CHANGES), config.digest(RESUMABLE_CHANGES)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise ValueError(
            f"cannot resume {path}: the config changed in {changed} (only {list(RESUMABLE_CHANGES)} may change); "
            "use a new pretrain.run name or train.resume: never"
        )


def pretrain(config: PretrainConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining; returns a summary. Call once per process (torchrun)."""
    info = init_distributed(config.train.device, config.train.backend)
    try:
        return _pretrain(config, Path(run_dir) if run_dir else default_run_dir(config), info)
    finally:
        shutdown(info)


def _prepare_run_dir(config: PretrainConfig, run_dir: Path, info: DistInfo) -> Path | None:
    """Create the run folder; return the checkpoint to resume from, if any."""
    resume = config.train.resume
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume == "never":
            for stale in (checkpoint_dir(run_dir), run_dir / RUN_METRICS_FILE, run_dir / "bag_index.parquet", run_dir / "val_metrics.csv"):
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
    barrier(info)
    if resume == "never":
        return None
    path = latest_checkpoint(run_dir) if resume == "auto" else Path(resume)
    if path is not None and not (path / "state.pt").exists():
        raise FileNotFoundError(f"pretrain.train.resume: {path} is not a checkpoint folder")
    val_csv = run_dir / "val_metrics.csv"
    if path is not None and info.is_main and val_csv.exists():  # drop rows written after the checkpoint
        step = int(path.name.split("_")[-1])
        rows = pd.read_csv(val_csv)
        rows[rows["step"] <= step].to_csv(val_csv, index=False)
    return path


def _index(config: PretrainConfig, run_dir: Path, info: DistInfo, resuming: bool) -> pd.DataFrame:
    """The bag index of the run: built by rank 0 when the run starts, reused when it resumes
    (so slides added to results/ meanwhile cannot shift the data order)."""
    path = run_dir / "bag_index.parquet"
    if info.is_main and not (resuming and path.exists()):
        d = config.data
        index = build_bag_index(d.paths(), d.magnifications, val_fraction=d.val_fraction, split_seed=d.split_seed)
        if not len(index) or not (index["split"] == "train").any():
            raise ValueError(f"no training bags found under {d.results} (encoder {d.image_encoder!r})")
        write_parquet(index, path)
    barrier(info)
    return pd.read_parquet(path)


def _pretrain(config: PretrainConfig, run_dir: Path, info: DistInfo) -> dict[str, Any]:
    t_start = time.perf_counter()
    if config.train.threads:
        torch.set_num_threads(int(config.train.threads))
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    resume_from = _prepare_run_dir(config, run_dir, info)
    index = _index(config, run_dir, info, resuming=resume_from is not None)
    parts = build_components(config, index)
    objective = parts.objective
    if info.is_main:
        write_config(config, run_dir / RUN_CONFIG_FILE)
        parts.tokenizer.save_pretrained(str(run_dir / TOKENIZER))

    sync_bn = config.train.sync_batchnorm == "always" or (
        config.train.sync_batchnorm == "auto" and info.distributed and info.device.type == "cuda")
    if sync_bn:
        objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    objective.to(info.device)
    optimizer = build_optimizer(objective, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.train.steps)

    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, objective, info)
        _check_resume(config, state, resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        if info.is_main:
            log.info("resumed %s at step %d", resume_from, step)

    module: nn.Module = objective
    if info.distributed:
        module = DistributedDataParallel(
            objective, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=config.active_terms != set(TERMS),
        )
    forward = torch.compile(module) if config.train.compile else module

    accum = config.train.accumulation_steps
    sampler = BagStreamSampler(len(parts.train_set), config.data.batch_size, rank=info.rank,
                               world_size=info.world_size, seed=config.seed, start=step * accum,
                               groups=parts.train_set.slide_numbers(), window=config.data.shuffle_window)
    loader = make_loader(parts.train_set, sampler, num_workers=config.data.num_workers,
                         prefetch_factor=config.data.prefetch_factor, pin_memory=info.device.type == "cuda")
    writer = MetricsWriter(run_dir / RUN_METRICS_FILE, resume_step=step if resume_from else None,
                           tensorboard_dir=run_dir / "tensorboard" if config.train.tensorboard else None) if info.is_main else None
    dtype = _precision(config, info.device)
    last = config.train.last_step
    params = [p for p in objective.parameters() if p.requires_grad]
    bags_per_step = config.data.batch_size * info.world_size * accum
    pairs_per_step = bags_per_step * config.data.patches_per_bag
    accumulator: MetricAccumulator | None = None
    data_time = compute_time = 0.0
    timed_steps = 0
    history: list[dict[str, float]] = []
    summary: dict[str, Any] = {"run_dir": str(run_dir), "start_step": step}

    batches = iter(loader)
    objective.train()
    while step < last:
        t0 = time.perf_counter()
        step_data = 0.0
        outputs: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            td = time.perf_counter()
            batch = _to_device(next(batches), info.device)
            step_data += time.perf_counter() - td
            seed = step_seed(config.seed, step, micro, info.rank)
            torch.manual_seed(seed)
            generator = torch.Generator(info.device).manual_seed(seed)
            sync = module.no_sync() if info.distributed and micro < accum - 1 else contextlib.nullcontext()
            with sync, torch.autocast(info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                outputs = forward(batch, generator)
                (outputs["loss"] / accum).backward()
            if accumulator is None:
                extra = _pair_keys(config.data.magnifications) if "mrtva" in config.active_terms and config.train.log_pair_types else []
                keys = metric_keys(outputs, info, extra=[*extra, "grad_norm"])
                accumulator = MetricAccumulator(keys, info.device)
            accumulator.add(outputs)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip if config.train.grad_clip > 0 else math.inf)
        accumulator.add({"grad_norm": grad_norm})
        lr = optimizer.param_groups[0]["lr"]  # base lr (the text encoder's group may be scaled)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        elapsed = time.perf_counter() - t0
        data_time += step_data
        compute_time += elapsed - step_data
        timed_steps += 1

        if step % config.train.log_every == 0 or step == last:
            values = accumulator.reduce(info)
            row = {"step": step, "epoch": sampler.epoch_of(step * accum - 1), "lr": lr, **values,
                   "data_s": data_time / timed_steps, "compute_s": compute_time / timed_steps,
                   "steps_per_s": timed_steps / (data_time + compute_time), "bags_per_s": bags_per_step * timed_steps / (data_time + compute_time)}
            history.append(row)
            if writer is not None:
                writer.write(row)
                log.info("step %d/%d loss %.4f %s lr %.3g data %.1f%%", step, config.train.steps, values.get("loss", math.nan),
                         " ".join(f"{t} {values[t]:.3f}" for t in TERMS if t in values), lr,
                         100 * data_time / max(1e-9, data_time + compute_time))
            data_time = compute_time = 0.0
            timed_steps = 0
        if config.train.val_every and parts.val_set is not None and step % config.train.val_every == 0:
            _validate(objective, parts.val_set, config, info, step, run_dir, dtype)
        if step % config.train.save_every == 0 or step == last:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "micro_batches": step * accum, "config": config.to_dict(), "fingerprint": config.fingerprint()}
            save_checkpoint(run_dir, step, objective, state, info, config.train.keep_last)

    if step >= config.train.steps and info.is_main:
        itc = objective.loss.terms["itc"] if objective.loss.is_active("itc") else None
        save_export(run_dir, objective.model, itc_temperature=itc.logit_scale.temperature if itc is not None else None,
                    extra={"run": config.run, "steps": step, "max_caption_tokens": config.data.max_caption_tokens,
                           "fingerprint": config.fingerprint()})
    barrier(info)
    if writer is not None:
        writer.close()
    summary.update(end_step=step, history=history, seconds=time.perf_counter() - t_start,
                   bags_per_step=bags_per_step, pairs_per_step=pairs_per_step, finished=step >= config.train.steps)
    return summary


@torch.no_grad()
def _validate(objective: MRPLIPObjective, dataset: BagDataset, config: PretrainConfig, info: DistInfo, step: int,
              run_dir: Path, dtype: torch.dtype | None) -> dict[str, float]:
    """Loss terms on the same ``val_batches`` batches every time (eval mode)."""
    sampler = BagStreamSampler(len(dataset), config.data.batch_size, rank=info.rank, world_size=info.world_size,
                               seed=config.seed, shuffle=False)
    loader = make_loader(dataset, sampler, num_workers=0)
    objective.eval()
    accumulator: MetricAccumulator | None = None
    for i, batch in zip(range(config.train.val_batches), loader):
        generator = torch.Generator(info.device).manual_seed(config.seed + i)
        with torch.autocast(info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = objective(_to_device(batch, info.device), generator)
        if accumulator is None:
            accumulator = MetricAccumulator(metric_keys(outputs, info), info.device)
        accumulator.add(outputs)
    objective.train()
    values = accumulator.reduce(info) if accumulator else {}
    if info.is_main:
        path = run_dir / "val_metrics.csv"
        row = pd.DataFrame([{"step": step, **values}])
        row.to_csv(path, mode="a", header=not path.exists(), index=False)
        log.info("validation step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return values
