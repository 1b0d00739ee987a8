"""Cross-resolution visual-textual alignment (CVTA).

A *visual bag* is one 5x parent patch with all its descendants (up to 85 patches at
5x/10x/20x/40x); its *textual bag* holds the keywords extracted from the captions of
those patches. For each visual feature v_a of bag b:

* s_aj = cos(v_a, t_j) for every keyword t_j of the same textual bag;
* the k_o keywords with the highest s_aj are the positives P_a, all other keywords of the
  bag are the negatives N_a;
* with a learnable temperature tau (init 0.07) and e(j) = exp(s_aj / tau),

      l_a = -(1 / |P_a|) sum_{p in P_a} log( e(p) / D_a(p) ),

  where the denominator D_a(p) is, by ``denominator``:

  - ``"all_keywords"`` (default, the paper's L_CVTA): the sum of e(j) over every keyword
    j of the textual bag, the other positives included;
  - ``"negatives_only"``: e(p) + sum_{n in N_a} e(n), each positive contrasted with the
    negatives only (the other positives are not pushed against it).

  See docs/objective.md for when one might prefer the second.

``L_CVTA`` is the mean of l_a over the patches of a bag, then the mean over bags.
Selection (top-k) carries no gradient; the similarities do.

Batches of bags of different sizes are padded: ``visual`` (B, P, D) with ``visual_mask``
(B, P) and ``keywords`` (B, K, D) with ``keyword_mask`` (B, K), True on real entries.
Padding is never a positive or a negative. When a bag has at most k_o keywords, every
keyword is a positive and none is a negative: such patches have no contrast, are
skipped, and a bag without any contrasting patch does not count in the mean over bags.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrplip_core.losses.temperature import LogitScale


class TopKKeywords(NamedTuple):
    """Output of :func:`select_topk_keywords`."""

    indices: Tensor
    """(B, P, k) long: keyword index (into K) of each patch's k best keywords, best first."""
    valid: Tensor
    """(B, P, k) bool: False for slots beyond the bag's keyword count or padded patches."""


def _masks(
    visual: Tensor, keywords: Tensor, visual_mask: Tensor | None, keyword_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    if visual_mask is None:
        visual_mask = torch.ones(visual.shape[:2], dtype=torch.bool, device=visual.device)
    if keyword_mask is None:
        keyword_mask = torch.ones(keywords.shape[:2], dtype=torch.bool, device=keywords.device)
    return visual_mask.bool(), keyword_mask.bool()


def cosine_similarity_matrix(
    visual: Tensor,
    keywords: Tensor,
    visual_mask: Tensor | None = None,
    keyword_mask: Tensor | None = None,
) -> Tensor:
    """Cosine similarity of every patch with every keyword of its own bag.

    (B, P, D) visual and (B, K, D) keywords -> (B, P, K). Padded rows are zeroed before
    normalising, so padding (even NaN padding) yields similarity 0, never NaN.
    """
    visual_mask, keyword_mask = _masks(visual, keywords, visual_mask, keyword_mask)
    visual = F.normalize(torch.where(visual_mask[..., None], visual, 0.0), dim=-1)
    keywords = F.normalize(torch.where(keyword_mask[..., None], keywords, 0.0), dim=-1)
    return visual @ keywords.transpose(1, 2)


@torch.no_grad()
def select_topk_keywords(
    similarity: Tensor,
    k: int,
    keyword_mask: Tensor | None = None,
    visual_mask: Tensor | None = None,
) -> TopKKeywords:
    """Each patch's k keywords of highest similarity, among the real keywords of its bag.

    Parameters
    ----------
    similarity:
        (B, P, K) from :func:`cosine_similarity_matrix`.
    k:
        k_o; the output has ``min(k, K)`` slots.
    keyword_mask, visual_mask:
        (B, K) and (B, P) bool, True on real entries.

    The fusion encoder reuses this to pick the keywords it fuses with each patch: gather
    with ``indices`` and drop slots where ``valid`` is False.
    """
    batch, _, num_keywords = similarity.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if keyword_mask is None:
        keyword_mask = torch.ones(batch, num_keywords, dtype=torch.bool, device=similarity.device)
    scores = similarity.float().masked_fill(~keyword_mask.bool()[:, None, :], float("-inf"))
    values, indices = scores.topk(min(k, num_keywords), dim=-1)
    valid = torch.isfinite(values)
    if visual_mask is not None:
        valid &= visual_mask.bool()[..., None]
    return TopKKeywords(indices, valid)


#: Values of ``CVTALoss(denominator=...)``; the first is the default (the paper's).
DENOMINATORS: tuple[str, ...] = ("all_keywords", "negatives_only")


class CVTALoss(nn.Module):
    """CVTA InfoNCE between patches and the keywords of their bag.

    Parameters
    ----------
    k_o:
        Number of positive keywords per patch.
    init_temperature, max_logit_scale, learn_temperature:
        The learnable tau (own parameter, separate from ITC's).
    denominator:
        ``"all_keywords"`` (default, the paper's): the denominator of each positive sums
        over all keywords of the bag, the other positives included. ``"negatives_only"``:
        the positive itself and the negatives.
    """

    name = "cvta"

    def __init__(
        self,
        k_o: int = 5,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        learn_temperature: bool = True,
        denominator: str = "all_keywords",
    ) -> None:
        super().__init__()
        if k_o < 1:
            raise ValueError(f"k_o must be >= 1, got {k_o}")
        if denominator not in DENOMINATORS:
            raise ValueError(f"denominator must be one of {list(DENOMINATORS)}, got {denominator!r}")
        self.k_o = k_o
        self.logit_scale = LogitScale(init_temperature, max_logit_scale, learn_temperature)
        self.denominator = denominator

    def patch_losses(
        self, similarity: Tensor, topk: TopKKeywords, keyword_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-patch loss l_a (B, P) and the (B, P) bool mask of patches that count
        (real patches with at least one positive and one negative)."""
        logits = self.logit_scale() * similarity.float()
        finite_min = torch.finfo(logits.dtype).min  # -inf would give NaN gradients
        positive = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        positive = positive.scatter(2, topk.indices, topk.valid)  # (B, P, K)
        negatives_only = self.denominator == "negatives_only"
        in_denominator = keyword_mask[:, None, :].expand_as(logits)
        if negatives_only:
            in_denominator = in_denominator & ~positive
        log_denominator = logits.masked_fill(~in_denominator, finite_min).logsumexp(dim=-1)
        positive_logits = logits.gather(2, topk.indices)  # (B, P, k)
        if negatives_only:  # log(e(p) + sum over negatives), per positive
            log_denominator = torch.logaddexp(positive_logits, log_denominator[..., None])
        else:  # one sum over all keywords, shared by the positives of a patch
            log_denominator = log_denominator[..., None].expand_as(positive_logits)
        per_positive = (log_denominator - positive_logits) * topk.valid
        num_positives = topk.valid.sum(dim=-1)
        num_negatives = (keyword_mask[:, None, :] & ~positive).sum(dim=-1)
        counts = (num_positives > 0) & (num_negatives > 0)
        return per_positive.sum(dim=-1) / num_positives.clamp(min=1), counts

    def forward(
        self,
        visual: Tensor,
        keywords: Tensor,
        visual_mask: Tensor | None = None,
        keyword_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """CVTA over a batch of bags.

        Parameters
        ----------
        visual:
            (B, P, D) patch features of B visual bags (projected to the shared space).
        keywords:
            (B, K, D) keyword features of the matching textual bags.
        visual_mask, keyword_mask:
            (B, P) and (B, K) bool, True on real entries (default: all real).

        Returns
        -------
        ``{"cvta": loss, "cvta/temperature": tau}`` (temperature detached).
        """
        visual_mask, keyword_mask = _masks(visual, keywords, visual_mask, keyword_mask)
        similarity = cosine_similarity_matrix(visual, keywords, visual_mask, keyword_mask)
        topk = select_topk_keywords(similarity, self.k_o, keyword_mask, visual_mask)
        losses, counts = self.patch_losses(similarity, topk, keyword_mask)
        patches_per_bag = counts.sum(dim=1)
        bag_losses = (losses * counts).sum(dim=1) / patches_per_bag.clamp(min=1)
        bags = patches_per_bag > 0
        # mean over counting bags, written without a host sync; 0 (with graph) if none
        loss = (bag_losses * bags).sum() / bags.sum().clamp(min=1)
        return {"cvta": loss, "cvta/temperature": (1.0 / self.logit_scale()).detach()}
