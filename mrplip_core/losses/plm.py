"""Prefix language modelling (PLM) loss, as in mPLUG/SimVLM.

The labels come from :func:`mrplip_core.data.lm_inputs.make_prefix_lm_batch` (suffix ids,
-100 on prefix and padding; drawn by the dataset). The loss shifts by one: logits at
position t predict the label at t + 1, so the first suffix token is predicted from the last
prefix position.
"""

from __future__ import annotations

from torch import Tensor, nn

from mrplip_core.losses.mlm import token_cross_entropy


class PLMLoss(nn.Module):
    """Next-token cross-entropy on the suffix only."""

    name = "plm"

    def forward(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """(B, L, V) logits (position t predicts token t + 1) and (B, L) labels from
        :func:`~mrplip_core.data.lm_inputs.make_prefix_lm_batch` -> ``{"plm": loss}``."""
        return {"plm": token_cross_entropy(logits[:, :-1], labels[:, 1:])}
