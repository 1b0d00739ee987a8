"""Masked language modelling (MLM), BERT-style.

``mask_tokens`` picks each maskable token with probability ``mask_prob`` (15 %); of the
picked tokens 80 % become ``[MASK]``, 10 % a random token and 10 % stay unchanged.
Special tokens and padding are never picked. Random replacements are drawn uniformly from
the vocabulary *without* the special tokens (BERT draws from the whole vocabulary; a
random ``[PAD]`` or ``[CLS]`` in the middle of a caption teaches nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


class MaskedTokens(NamedTuple):
    """Output of :func:`mask_tokens`."""

    input_ids: Tensor
    """(B, L) long: the corrupted ids to feed the text encoder."""
    labels: Tensor
    """(B, L) long: original id at picked positions, -100 elsewhere."""


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int],
    attention_mask: Tensor | None = None,
    mask_prob: float = 0.15,
    mask_token_frac: float = 0.8,
    random_token_frac: float = 0.1,
    generator: torch.Generator | None = None,
) -> MaskedTokens:
    """Corrupt token ids for MLM.

    Parameters
    ----------
    input_ids:
        (B, L) long token ids.
    mask_token_id, vocab_size:
        Id of ``[MASK]`` and the size of the vocabulary.
    special_token_ids:
        Ids never picked and never used as random replacements (``[CLS]``, ``[SEP]``,
        ``[PAD]``, ``[MASK]``, ...).
    attention_mask:
        (B, L), nonzero on real tokens; zero positions (padding) are never picked.
    mask_prob:
        Probability that a maskable token is picked (Bernoulli per token).
    mask_token_frac, random_token_frac:
        Of the picked tokens, the share replaced by ``[MASK]`` and by a random token; the
        rest stay unchanged.
    generator:
        Source of randomness (on the device of ``input_ids``).
    """
    if not 0.0 <= mask_token_frac + random_token_frac <= 1.0:
        raise ValueError("mask_token_frac + random_token_frac must lie in [0, 1]")
    device = input_ids.device
    special = torch.tensor(sorted(set(special_token_ids)), dtype=torch.long, device=device)
    maskable = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        maskable &= attention_mask.bool()

    picked = maskable & (
        torch.rand(input_ids.shape, generator=generator, device=device) < mask_prob
    )
    labels = input_ids.masked_fill(~picked, IGNORE_INDEX)

    action = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = picked & (action < mask_token_frac)
    to_random = (
        picked & (action >= mask_token_frac) & (action < mask_token_frac + random_token_frac)
    )

    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special[special < vocab_size]] = False
    replacement_pool = allowed.nonzero().squeeze(1)
    random_ids = replacement_pool[
        torch.randint(len(replacement_pool), input_ids.shape, generator=generator, device=device)
    ]

    corrupted = input_ids.masked_fill(to_mask, mask_token_id)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return MaskedTokens(corrupted, labels)


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
        labels from :func:`mask_tokens` -> ``{"mlm": loss}``."""
        return {"mlm": token_cross_entropy(logits, labels)}
