"""Language-model inputs drawn from a caption batch: MLM corruption and the prefix-LM split.

The dataset draws both per item (:mod:`mrplip_core.data.dataset`), so a sample is the same
whichever rank or worker draws it; the MLM and PLM losses (:mod:`mrplip_core.losses.mlm`,
:mod:`mrplip_core.losses.plm`) read the labels made here.

Masked language modelling, BERT-style: :func:`mask_tokens` picks each maskable token with
probability ``mask_prob`` (15 %); of the picked tokens 80 % become ``[MASK]``, 10 % a random
token and 10 % stay unchanged. Special tokens and padding are never picked. Random
replacements are drawn uniformly from the vocabulary *without* the special tokens (BERT
draws from the whole vocabulary; a random ``[PAD]`` or ``[CLS]`` in the middle of a caption
teaches nothing).

Prefix language modelling, as in mPLUG/SimVLM: :func:`make_prefix_lm_batch` splits each
caption at a prefix length p: tokens ``[0, p)`` are context (seen bidirectionally, together
with the image), tokens ``[p, n)`` are generated left to right. Labels are aligned with
``input_ids`` (HF convention): ``labels[t] = input_ids[t]`` on the suffix, -100 on the
prefix and on padding. Captions are assumed right-padded (real tokens first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

#: Label of a position without a target (the ``ignore_index`` of the MLM and PLM cross-entropy).
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
