"""Learnable softmax temperature, parametrised as in CLIP.

The module stores ``log(1 / tau)`` and returns the logit scale ``1 / tau``, clamped to
``[1, max_scale]`` (CLIP clamps at 100, i.e. tau >= 0.01). Clamping happens in the forward
pass, so the parameter receives no gradient while it sits outside the range; the trainer
need not clamp it in place.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LogitScale(nn.Module):
    """Learnable inverse temperature ``1 / tau`` (a scalar).

    Parameters
    ----------
    init_temperature:
        Initial tau (0.07 in CLIP, ALBEF and MR-PLIP).
    max_scale:
        Upper bound on ``1 / tau``; 100 means tau never goes below 0.01.
    learnable:
        False freezes tau at ``init_temperature``.
    """

    def __init__(
        self, init_temperature: float = 0.07, max_scale: float = 100.0, learnable: bool = True
    ) -> None:
        super().__init__()
        if not 0.0 < init_temperature <= 1.0:
            raise ValueError(f"init_temperature must be in (0, 1], got {init_temperature}")
        if max_scale < 1.0 / init_temperature:
            raise ValueError(
                f"max_scale={max_scale} is below the initial scale 1/{init_temperature}"
            )
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learnable
        )
        self.max_log_scale = math.log(max_scale)

    def forward(self) -> Tensor:
        """Return ``1 / tau`` as a 0-d tensor (clamped to ``[1, max_scale]``)."""
        return self.log_scale.clamp(0.0, self.max_log_scale).exp()

    @property
    def temperature(self) -> float:
        """Current tau as a Python float (for logging)."""
        return float(1.0 / self.forward().detach())
