"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mrplip_core.train.config import OptimSettings


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier for optimizer update ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps`` updates, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _no_decay_ids(module: nn.Module) -> set[int]:
    """Parameters of embeddings and norms, and every parameter with fewer than 2 dims."""
    ids = {id(p) for p in module.parameters() if p.ndim < 2}
    for sub in module.modules():
        if isinstance(sub, (nn.Embedding, nn.LayerNorm, nn.modules.batchnorm._NormBase)) or "Norm" in type(sub).__name__:
            ids.update(id(p) for p in sub.parameters(recurse=False))
    return ids


def build_optimizer(module: nn.Module, settings: OptimSettings, text_prefix: str = "model.text.") -> torch.optim.AdamW:
    """AdamW with four groups: (text encoder | rest) x (decay | no decay).

    No weight decay on biases, norms, embeddings (word, position, magnification) and
    temperatures. The text encoder's lr is scaled by ``text_encoder_lr_scale``.
    """
    no_decay = _no_decay_ids(module)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            groups.setdefault((name.startswith(text_prefix), id(param) in no_decay), []).append(param)
    param_groups = []
    for (is_text, no_decay), params in sorted(groups.items()):
        param_groups.append({
            "params": params,
            "weight_decay": 0.0 if no_decay else settings.weight_decay,
            "lr": settings.lr * (settings.text_encoder_lr_scale if is_text else 1.0),
        })
    return torch.optim.AdamW(param_groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimSettings, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-update warmup + cosine (see :func:`warmup_cosine`); its state is plain numbers."""
    warmup, floor = settings.warmup_steps, settings.min_lr_ratio
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total_steps, floor))
