"""Prefix language modelling (PLM), as in mPLUG/SimVLM.

Each caption is split at a prefix length p: tokens ``[0, p)`` are context (seen
bidirectionally, together with the image), tokens ``[p, n)`` are generated left to right.
Labels are aligned with ``input_ids`` (HF convention): ``labels[t] = input_ids[t]`` on the
suffix, -100 on the prefix and on padding. The loss shifts by one: logits at position t
predict the label at t + 1, so the first suffix token is predicted from the last prefix
position. Captions are assumed right-padded (real tokens first).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from mrplip_core.losses.mlm import IGNORE_INDEX, token_cross_entropy


class PrefixLMBatch(NamedTuple):
    """Output of :func:`make_prefix_lm_batch`."""

    input_ids: Tensor
    """(B, L) long, unchanged input ids (the model sees prefix and, causally, suffix)."""
    labels: Tensor
    """(B, L) long: ids on the suffix, -100 on prefix and padding."""
    prefix_lengths: Tensor
    """(B,) long: p per caption; p == n means the caption has no suffix."""


def make_prefix_lm_batch(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    prefix_lengths: Tensor | None = None,
    min_prefix: int = 1,
    generator: torch.Generator | None = None,
) -> PrefixLMBatch:
    """Build PLM inputs and labels.

    Parameters
    ----------
    input_ids:
        (B, L) long ids, right-padded.
    attention_mask:
        (B, L), nonzero on the n_i real tokens of caption i.
    prefix_lengths:
        (B,) given split points; if None, p_i is drawn uniformly from
        ``[min_prefix, n_i - 1]`` so that at least one token is predicted (captions with
        ``n_i <= min_prefix`` get ``p_i = n_i``: no suffix, all labels -100).
    min_prefix:
        Smallest random prefix (1 keeps ``[CLS]`` as context).
    generator:
        Source of randomness for the random split.
    """
    lengths = attention_mask.bool().sum(dim=1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    real = positions[None, :] < lengths[:, None]
    if not torch.equal(real, attention_mask.bool()):
        raise ValueError("make_prefix_lm_batch expects right-padded captions")
    if prefix_lengths is None:
        span = (lengths - min_prefix).clamp(min=0)
        draw = torch.rand(lengths.shape, generator=generator, device=lengths.device)
        prefix_lengths = min_prefix + (draw * span).floor().long()
        prefix_lengths = torch.where(span > 0, prefix_lengths, lengths)
    prefix_lengths = prefix_lengths.to(device=input_ids.device, dtype=torch.long)
    suffix = real & (positions[None, :] >= prefix_lengths[:, None])
    labels = input_ids.masked_fill(~suffix, IGNORE_INDEX)
    return PrefixLMBatch(input_ids, labels, prefix_lengths)


def prefix_lm_attention_mask(prefix_lengths: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L, L) bool, True where query t may attend to key s.

    A query attends to every real prefix token and causally (``s <= t``) to the suffix;
    padding keys are never attended. For the text decoder of the PLM branch.
    """
    length = attention_mask.shape[1]
    positions = torch.arange(length, device=attention_mask.device)
    key_in_prefix = positions[None, None, :] < prefix_lengths[:, None, None]
    causal = positions[None, None, :] <= positions[None, :, None]
    return (key_in_prefix | causal) & attention_mask.bool()[:, None, :]


class PLMLoss(nn.Module):
    """Next-token cross-entropy on the suffix only."""

    name = "plm"

    def forward(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """(B, L, V) logits (position t predicts token t + 1) and (B, L) labels from
        :func:`make_prefix_lm_batch` -> ``{"plm": loss}``."""
        return {"plm": token_cross_entropy(logits[:, :-1], labels[:, 1:])}
