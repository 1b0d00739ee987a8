"""Masked language modelling (MLM) loss, BERT-style.

The corrupted captions and their labels come from
:func:`mrplip_core.data.lm_inputs.mask_tokens` (drawn by the dataset).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mrplip_core.data.lm_inputs import IGNORE_INDEX


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over positions whose label is not -100.

    (B, L, V) logits and (B, L) labels -> scalar. When no position is labelled the result
    is a zero that still depends on ``logits`` (backward works; no NaN).
    """
    summed = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return summed / (labels != IGNORE_INDEX).sum().clamp(min=1)


class MLMLoss(nn.Module):
    """Cross-entropy on the masked positions; the model predicts the original ids."""

    name = "mlm"

    def forward(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """(B, L, V) logits from the text decoder head on the corrupted input and (B, L)
        labels from :func:`~mrplip_core.data.lm_inputs.mask_tokens` -> ``{"mlm": loss}``."""
        return {"mlm": token_cross_entropy(logits, labels)}
