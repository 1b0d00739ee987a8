"""The training loop shared by the model families (MR-PLIP, PathFLIP): one process per device,
launched by ``torchrun``.

A family (:class:`TrainingFamily`) says what is trained: its data index, datasets and
collation, the objective module (model + loss; ``forward(batch, generator)`` returns a dict
with ``loss`` and the terms to log), which config changes a resume tolerates, and how the
finished model is exported. The loop owns everything else: process group, precision,
gradient accumulation, DDP, optimizer and schedule, metrics, validation, checkpoints and
exact resume.

Exactness of resume (bitwise on CPU): the data position is one integer (batches consumed,
see :class:`mrplip_core.data.BagStreamSampler`), every sample's randomness is a function of
``(seed, epoch, item)``, and the global RNGs (dropout) and the objective's generator are
reseeded from ``(seed, step, micro-batch, rank)`` before every micro-batch. A checkpoint holds
the weights (safetensors), the optimizer and scheduler states, the data position and each
rank's RNG states, all loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from mrplip_core.data import BagStreamSampler
from mrplip_core.data.dataset import item_seed
from mrplip_core.train.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from mrplip_core.train.config import OptimSettings, TrainSettings
from mrplip_core.train.distributed import DistInfo, barrier, init_distributed, shutdown
from mrplip_core.train.metrics import MetricAccumulator, MetricsWriter, metric_keys
from mrplip_core.train.schedule import build_optimizer, build_scheduler
from mrplip_core.train.summary import RUN_METRICS_FILE

VAL_METRICS_FILE = "val_metrics.csv"


@dataclass
class Built:
    """What a family builds for one process (seeded: identical on every rank)."""

    objective: nn.Module  # forward(batch, generator) -> {"loss": ..., term: value, ...}
    train_set: Dataset
    val_set: Dataset | None
    collate: Callable[[Sequence[Any]], dict[str, torch.Tensor]]
    groups: Sequence[int] | None = None  # slide number of every training item (shuffle window)
    window: int = 0  # slides per shuffle window (see BagStreamSampler)
    find_unused_parameters: bool = False  # DDP: some parameters get no gradient in a step
    extra_metric_keys: Sequence[str] = ()  # keys logged although the first step may lack them


class TrainingFamily(ABC):
    """One model family's side of training (see the module docstring).

    ``config`` is a :class:`mrplip_core.train.config.RunConfig` with ``seed``, ``train``
    (:class:`TrainSettings`), ``optim`` (:class:`OptimSettings`) and ``data`` (``batch_size``,
    ``num_workers``, ``prefetch_factor``).
    """

    name: str = "model"
    items: str = "items"  # what one sample is called in the metrics (bags, slides)
    stale_files: tuple[str, ...] = ()  # run-folder files removed when a run starts afresh

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def train_settings(self) -> TrainSettings:
        return self.config.train

    @property
    def optim_settings(self) -> OptimSettings:
        return self.config.optim

    @property
    def batch_size(self) -> int:
        """Items per rank per micro-batch (``config.data.batch_size``)."""
        return int(self.config.data.batch_size)

    @property
    def loader_settings(self) -> tuple[int, int]:
        """``(num_workers, prefetch_factor)`` of the training loader (``config.data``)."""
        return int(self.config.data.num_workers), int(self.config.data.prefetch_factor)

    @abstractmethod
    def prepare(self, run_dir: Path, info: DistInfo, resuming: bool) -> None:
        """Make or reuse the run's data index (rank 0 writes it; every rank reads it)."""

    @abstractmethod
    def build(self, info: DistInfo) -> Built:
        """Datasets and objective (called once per process, after :meth:`prepare`)."""

    def write_run_files(self, run_dir: Path) -> None:
        """Rank 0: the resolved config and whatever else a reader of the run folder needs."""

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        """Raise when the saved config of checkpoint ``path`` cannot be resumed with this one."""

    def log_line(self, values: dict[str, float]) -> str:
        """The terms part of the progress log line."""
        return " ".join(f"{k} {v:.3f}" for k, v in values.items() if k not in ("loss", "grad_norm") and "/" not in k)

    def text_prefix(self) -> str:
        """Parameter-name prefix of the text encoder (its lr scale)."""
        return "model.text."

    @abstractmethod
    def export(self, run_dir: Path, objective: nn.Module, step: int) -> None:
        """Rank 0, once the run has reached ``train.steps``: write the exported model."""


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of the global RNGs and the objective's generator for one micro-batch."""
    return item_seed(seed, 1_000_000 + step, micro * 65_536 + rank)


def reseed_globals(seed: int) -> None:
    """Seed torch's, numpy's and Python's global RNGs for one micro-batch.

    Every random draw of a step then depends on the step alone, not on how many steps this
    process ran before: a run resumed from a checkpoint draws what an uninterrupted one would
    (numpy and ``random`` included, which a checkpoint's saved states alone do not ensure when
    a library draws from them outside the loop).
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def deterministic_torch(device: torch.device) -> None:
    """Make torch's kernels deterministic (a resumed run equals an uninterrupted one bit for bit).

    ``torch.use_deterministic_algorithms`` with ``warn_only`` (an op without a deterministic
    kernel warns instead of failing); on GPU cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before
    its first use, and cuDNN's autotuner is off.
    """
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def precision(train: TrainSettings, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32 (``auto``: bf16 on GPU, fp32 on CPU)."""
    wanted = train.precision
    if wanted == "auto":
        wanted = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if wanted == "bf16" else None


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _worker_init(worker_id: int) -> None:
    from mrplip_core.lifetime import die_with_parent

    die_with_parent()  # a loader worker must not outlive its trainer (killed with SIGKILL)


def make_batches(dataset: Dataset, sampler: BagStreamSampler, collate: Callable, *, num_workers: int = 0,
                 prefetch_factor: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``sampler``'s batches (endless; take as many as needed). Its workers die
    with the trainer (:func:`mrplip_core.lifetime.die_with_parent`)."""
    kwargs: dict[str, Any] = {"prefetch_factor": prefetch_factor, "worker_init_fn": _worker_init} if num_workers > 0 else {}
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, **kwargs)


def train(family: TrainingFamily, run_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) one family's training; returns a summary. Call once per process."""
    t = family.train_settings
    info = init_distributed(t.device, t.backend)
    try:
        return _train(family, Path(run_dir), info)
    finally:
        shutdown(info)


def _prepare_run_dir(family: TrainingFamily, run_dir: Path, info: DistInfo) -> Path | None:
    """Create the run folder; return the checkpoint to resume from, if any."""
    resume = family.train_settings.resume
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume == "never":
            for name in (RUN_METRICS_FILE, VAL_METRICS_FILE, *family.stale_files):
                (run_dir / name).unlink(missing_ok=True)
            if checkpoint_dir(run_dir).is_dir():
                shutil.rmtree(checkpoint_dir(run_dir))
    barrier(info)
    if resume == "never":
        return None
    path = latest_checkpoint(run_dir) if resume == "auto" else Path(resume)
    if path is not None and not (path / "state.pt").exists():
        raise FileNotFoundError(f"train.resume: {path} is not a checkpoint folder")
    val_csv = run_dir / VAL_METRICS_FILE
    if path is not None and info.is_main and val_csv.exists():  # drop rows written after the checkpoint
        step = int(path.name.split("_")[-1])
        rows = pd.read_csv(val_csv)
        rows[rows["step"] <= step].to_csv(val_csv, index=False)
    return path


def _train(family: TrainingFamily, run_dir: Path, info: DistInfo) -> dict[str, Any]:
    t_start = time.perf_counter()
    config, t = family.config, family.train_settings
    log = logging.getLogger(f"mrplip.{family.name}")
    if t.threads:
        torch.set_num_threads(int(t.threads))
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deterministic_torch(info.device)
    resume_from = _prepare_run_dir(family, run_dir, info)
    family.prepare(run_dir, info, resuming=resume_from is not None)
    built = family.build(info)
    objective = built.objective
    if info.is_main:
        family.write_run_files(run_dir)
    objective.to(info.device)
    optimizer = build_optimizer(objective, family.optim_settings, text_prefix=family.text_prefix())
    scheduler = build_scheduler(optimizer, family.optim_settings, t.steps)

    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, objective, info)
        family.check_resume(state, resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        if info.is_main:
            log.info("resumed %s at step %d", resume_from, step)

    module: nn.Module = objective
    if info.distributed:
        module = DistributedDataParallel(
            objective, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=built.find_unused_parameters,
        )
    forward = torch.compile(module) if t.compile else module

    accum = t.accumulation_steps
    batch_size = family.batch_size
    sampler = BagStreamSampler(len(built.train_set), batch_size, rank=info.rank, world_size=info.world_size,
                               seed=config.seed, start=step * accum, groups=built.groups, window=built.window)
    workers, prefetch = family.loader_settings
    loader = make_batches(built.train_set, sampler, built.collate, num_workers=workers, prefetch_factor=prefetch,
                          pin_memory=info.device.type == "cuda")
    writer = MetricsWriter(run_dir / RUN_METRICS_FILE, resume_step=step if resume_from else None,
                           tensorboard_dir=run_dir / "tensorboard" if t.tensorboard else None) if info.is_main else None
    dtype = precision(t, info.device)
    last = t.last_step
    params = [p for p in objective.parameters() if p.requires_grad]
    items_per_step = batch_size * info.world_size * accum
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
        for micro in range(accum):
            td = time.perf_counter()
            batch = to_device(next(batches), info.device)
            step_data += time.perf_counter() - td
            seed = step_seed(config.seed, step, micro, info.rank)
            reseed_globals(seed)
            generator = torch.Generator(info.device).manual_seed(seed)
            sync = module.no_sync() if info.distributed and micro < accum - 1 else contextlib.nullcontext()
            with sync, torch.autocast(info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                outputs = forward(batch, generator)
                (outputs["loss"] / accum).backward()
            if accumulator is None:
                keys = metric_keys(outputs, info, extra=[*built.extra_metric_keys, "grad_norm"])
                accumulator = MetricAccumulator(keys, info.device)
            accumulator.add(outputs)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf)
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

        if step % t.log_every == 0 or step == last:
            values = accumulator.reduce(info)
            seconds = data_time + compute_time
            row = {"step": step, "epoch": sampler.epoch_of(step * accum - 1), "lr": lr, **values,
                   "data_s": data_time / timed_steps, "compute_s": compute_time / timed_steps,
                   "steps_per_s": timed_steps / seconds, f"{family.items}_per_s": items_per_step * timed_steps / seconds}
            history.append(row)
            if writer is not None:
                writer.write(row)
                log.info("step %d/%d loss %.4f %s lr %.3g data %.1f%%", step, t.steps, values.get("loss", math.nan),
                         family.log_line(values), lr, 100 * data_time / max(1e-9, seconds))
            data_time = compute_time = 0.0
            timed_steps = 0
        if t.val_every and built.val_set is not None and step % t.val_every == 0:
            validate(family, objective, built, info, step, run_dir, dtype)
        if step % t.save_every == 0 or step == last:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "micro_batches": step * accum, "config": config.to_dict(), "fingerprint": config.fingerprint()}
            save_checkpoint(run_dir, step, objective, state, info, t.keep_last)

    if step >= t.steps and info.is_main:
        family.export(run_dir, objective, step)
    barrier(info)
    if writer is not None:
        writer.close()
    summary.update(end_step=step, history=history, seconds=time.perf_counter() - t_start,
                   items_per_step=items_per_step, finished=step >= t.steps)
    return summary


@torch.no_grad()
def validate(family: TrainingFamily, objective: nn.Module, built: Built, info: DistInfo, step: int,
             run_dir: Path, dtype: torch.dtype | None) -> dict[str, float]:
    """Loss terms on the same ``val_batches`` batches every time (eval mode)."""
    config, t = family.config, family.train_settings
    assert built.val_set is not None
    sampler = BagStreamSampler(len(built.val_set), family.batch_size, rank=info.rank, world_size=info.world_size,
                               seed=config.seed, shuffle=False)
    loader = make_batches(built.val_set, sampler, built.collate)
    objective.eval()
    accumulator: MetricAccumulator | None = None
    for i, batch in zip(range(t.val_batches), loader):
        generator = torch.Generator(info.device).manual_seed(config.seed + i)
        with torch.autocast(info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = objective(to_device(batch, info.device), generator)
        if accumulator is None:
            accumulator = MetricAccumulator(metric_keys(outputs, info), info.device)
        accumulator.add(outputs)
    objective.train()
    values = accumulator.reduce(info) if accumulator else {}
    if info.is_main:
        path = run_dir / VAL_METRICS_FILE
        row = pd.DataFrame([{"step": step, **values}])
        row.to_csv(path, mode="a", header=not path.exists(), index=False)
        logging.getLogger(f"mrplip.{family.name}").info(
            "validation step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return values
