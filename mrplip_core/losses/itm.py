"""Image-text matching (ITM) with hard negatives mined from ITC similarities.

For every image one negative text is drawn with probability ``softmax(sim_i2t[i])`` over
the other texts of the local batch, and for every text one negative image with
probability ``softmax(sim_t2i[j])``; the positive (and any pair marked in ``exclude``) is
never drawn. The fusion model scores the B positive pairs, the B (image, negative text)
pairs and the B (negative image, text) pairs; a head maps each pooled output to one
logit, and the loss is binary cross-entropy over the 3B pairs (targets 1, 0, 0).

Ownership: the fusion model is *passed in* at call time as ``fuse`` (it belongs to the
model); the ITM head *belongs to this loss* (``ITMLoss.head``, ``nn.Linear(dim, 1)`` by
default, or any module given as ``head``), so its parameters come with the loss module.
Negatives are mined within the local batch (as in ALBEF), not across ranks.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FuseFn(Protocol):
    """The multimodal encoder as ITM sees it."""

    def __call__(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """(M, ...) image tokens, (M, L, D) text tokens, (M, L) mask -> (M, D_fused)."""
        ...


def sample_hard_negatives(
    similarity: Tensor, exclude: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Draw one negative column per row with probability ``softmax(similarity[row])``.

    Parameters
    ----------
    similarity:
        (B, C) logits (scaled similarities); row i is the query, columns the candidates.
    exclude:
        (B, C) bool, True where a candidate must never be drawn. Default: the diagonal
        (the positive of row i is column i), which requires B == C.
    generator:
        Source of randomness; on the device of ``similarity``.

    Returns
    -------
    (B,) long column index per row. Raises ValueError if a row has no allowed candidate.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be (B, C), got {tuple(similarity.shape)}")
    if exclude is None:
        if similarity.shape[0] != similarity.shape[1]:
            raise ValueError("exclude is required when similarity is not square")
        exclude = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    if bool(exclude.all(dim=1).any()):
        raise ValueError("ITM needs at least one allowed negative per row (batch size >= 2)")
    logits = similarity.detach().float().masked_fill(exclude, float("-inf"))
    probabilities = torch.softmax(logits, dim=1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


class ITMLoss(nn.Module):
    """ITM: binary classification of matched vs hard-negative image-text pairs.

    Parameters
    ----------
    dim:
        Width of the pooled fusion output (ignored when ``head`` is given).
    head:
        Module mapping (M, dim) -> (M, 1) or (M,) logits; default ``nn.Linear(dim, 1)``.
    """

    name = "itm"

    def __init__(self, dim: int, head: nn.Module | None = None) -> None:
        super().__init__()
        self.head = head if head is not None else nn.Linear(dim, 1)

    def sample_negatives(
        self,
        sim_i2t: Tensor,
        sim_t2i: Tensor | None = None,
        exclude: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(negative text index per image, negative image index per text), each (B,).

        ``sim_t2i`` defaults to ``sim_i2t.T``; ``exclude`` (B, B) is in image-by-text
        order and is transposed for the text side.
        """
        if sim_t2i is None:
            sim_t2i = sim_i2t.T
        negative_text = sample_hard_negatives(sim_i2t, exclude, generator)
        negative_image = sample_hard_negatives(
            sim_t2i, None if exclude is None else exclude.T, generator
        )
        return negative_text, negative_image

    def forward(
        self,
        fuse: FuseFn,
        image_tokens: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        sim_i2t: Tensor,
        sim_t2i: Tensor | None = None,
        exclude: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """ITM loss over B positives and 2B mined negatives.

        Parameters
        ----------
        fuse:
            Multimodal encoder, ``fuse(image_tokens, text_tokens, text_mask) -> pooled``;
            called once on the 3B pairs.
        image_tokens:
            (B, ...) visual input of each pair (e.g. (B, 1, D) patch feature or (B, P, D)).
        text_tokens, text_mask:
            (B, L, D) text token embeddings and (B, L) attention mask.
        sim_i2t, sim_t2i:
            (B, B) image-to-text / text-to-image logits from ITC (no gradient needed);
            ``sim_t2i`` defaults to ``sim_i2t.T``.
        exclude:
            (B, B) bool, image-by-text pairs that must not be drawn as negatives (e.g.
            duplicate captions); the diagonal is always excluded.
        generator:
            Makes the draw reproducible.

        Returns
        -------
        ``{"itm": loss, "itm/accuracy": fraction of the 3B pairs classified right}``.
        """
        batch = image_tokens.shape[0]
        eye = torch.eye(batch, dtype=torch.bool, device=sim_i2t.device)
        exclude = eye if exclude is None else exclude | eye
        negative_text, negative_image = self.sample_negatives(sim_i2t, sim_t2i, exclude, generator)
        negative_text = negative_text.to(image_tokens.device)
        negative_image = negative_image.to(image_tokens.device)
        pooled = fuse(
            torch.cat([image_tokens, image_tokens, image_tokens[negative_image]]),
            torch.cat([text_tokens, text_tokens[negative_text], text_tokens]),
            torch.cat([text_mask, text_mask[negative_text], text_mask]),
        )
        logits = self.head(pooled).reshape(3 * batch).float()
        targets = torch.zeros_like(logits)
        targets[:batch] = 1.0
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        accuracy = ((logits > 0).float() == targets).float().mean().detach()
        return {"itm": loss, "itm/accuracy": accuracy}
