"""MR-PLIP pretraining: config, objective, DDP loop, checkpoints, metrics.

``mrplip pretrain`` (see :mod:`mrplip_core.train.cli`) resolves a
:class:`PretrainConfig` and calls :func:`pretrain` in every torchrun process.

Names are imported lazily, so ``mrplip_core.train.cli`` (imported by every ``mrplip``
command to register the verb) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PretrainConfig": "mrplip_core.train.config",
    "load_config": "mrplip_core.train.config",
    "MRPLIPObjective": "mrplip_core.train.objective",
    "build_components": "mrplip_core.train.trainer",
    "pretrain": "mrplip_core.train.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mrplip_core.train' has no attribute {name!r}")
