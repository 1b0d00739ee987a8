"""PathFLIP's two objectives: L_slide (slide <-> whole caption) and L_region (text-conditioned
region embeddings <-> sub-captions), with cross-rank negatives under DDP.

Notation: a rank holds B slides; slide i has up to K sub-captions (``valid[i, k]``); W ranks.

**L_slide** is the symmetric InfoNCE of CLIP between the slide embedding and the embedding of
the slide's whole caption, over the global batch of W*B slides. It is :class:`ITCLoss` in its
exact-gradient distributed mode (``local_loss=True, gather_with_grad=True``, see
:mod:`mrplip_core.losses.itc`): the mean over ranks of the loss, and after DDP's average the
gradient, equal those of one process holding the whole batch.

**L_region** is the sigmoid loss of SigLIP as FLAIR applies it to text-conditioned image
embeddings. For slide i and a text query q, ``r(i, q)`` is slide i's patches pooled by q (the
model's pooling; its weights are the localisation). The logit is
``s * cos(r(i, q), q) + b`` with a learnable scale ``s`` (stored as log s) and bias ``b``.

* Positives (label +1): the K sub-captions of slide i itself.
* Negatives (label -1): one sub-caption of every *other* slide of the global batch (its first
  drawn sub-caption, ``q_j = text[j, 0]``; the data draws sub-captions in a seeded random order
  each step, so this is a random one). A negative whose text is identical to one of slide i's
  own sub-captions (``text_key`` equal) is left out: "No necrosis is seen." in two reports is
  not a mismatch.
* ``l_i = mean over slide i's counted pairs of -log sigmoid(y * logit)``; the loss is the mean
  of ``l_i`` over the rank's slides. Under DDP the negatives of all ranks are gathered with
  gradient, so, as for L_slide, DDP's averaged gradient equals the single-process gradient
  (every rank holds the same B).

The positives and the negatives enter the same per-slide mean; the bias (initialised to
``init_bias``) absorbs their imbalance, as in SigLIP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mrplip_core.losses.itc import ITCLoss, _AllGatherWithGrad, _rank_and_world_size

#: Term names of PathFLIP's objective, in logging order.
PATHFLIP_TERMS: tuple[str, ...] = ("slide", "region")

#: The ``pathflip.loss`` section's defaults (workflow/schemas/config.schema.yaml holds the same).
PATHFLIP_LOSS_DEFAULTS: dict[str, Any] = {
    "weights": {"slide": 1.0, "region": 1.0},
    "slide": {"init_temperature": 0.07, "max_logit_scale": 100.0, "learn_temperature": True},
    "region": {"init_scale": 10.0, "init_bias": -10.0, "learnable": True, "exclude_identical_negatives": True},
}


def gather_rows(tensor: Tensor, *, with_grad: bool) -> Tensor:
    """(B, ...) of every rank concatenated in rank order: (W*B, ...); itself with one process."""
    _, world_size = _rank_and_world_size(None)
    if world_size == 1:
        return tensor
    if with_grad:
        return _AllGatherWithGrad.apply(tensor, None)
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class SlideCaptionLoss(ITCLoss):
    """L_slide: InfoNCE between slide and caption embeddings (keys ``slide``, ``slide/temperature``)."""

    name = "slide"

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0, learn_temperature: bool = True) -> None:
        super().__init__(init_temperature, max_logit_scale, learn_temperature, local_loss=True, gather_with_grad=True)

    def forward(self, slide: Tensor, caption: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """``slide``, ``caption``: (B, E) embeddings of B matching (slide, caption) pairs."""
        out = super().forward(slide, caption)
        return {"slide": out["itc"], "slide/temperature": out["itc/temperature"]}


class RegionLoss(nn.Module):
    """L_region: FLAIR-style sigmoid loss of text-conditioned region embeddings (module docstring)."""

    name = "region"

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, learnable: bool = True,
                 exclude_identical_negatives: bool = True) -> None:
        super().__init__()
        if init_scale <= 0:
            raise ValueError(f"pathflip.loss.region.init_scale must be > 0, got {init_scale}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learnable)
        self.bias = nn.Parameter(torch.tensor(float(init_bias)), requires_grad=learnable)
        self.exclude_identical_negatives = exclude_identical_negatives

    def queries(self, text: Tensor, text_key: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The queries every local slide is pooled by: its own K sub-captions, then the first
        sub-caption of each slide of the global batch.

        Returns ``(negatives (W*B, E), negative keys (W*B,), global index of local slide 0)``.
        """
        rank, _ = _rank_and_world_size(None)
        negatives = gather_rows(text[:, 0], with_grad=True)
        keys = gather_rows(text_key[:, 0].contiguous(), with_grad=False)
        return negatives, keys, torch.tensor(rank * text.shape[0])

    def forward(self, pool: Callable[[Tensor], Tensor], text: Tensor, valid: Tensor, text_key: Tensor) -> dict[str, Tensor]:
        """L_region of the rank's B slides.

        Parameters
        ----------
        pool: ``pool(queries (B, Q, E)) -> (B, Q, E)``, the region embedding of each local slide
            for each of its Q text queries (the model's text-conditioned pooling).
        text: (B, K, E) sub-caption embeddings; ``text[:, 0]`` must be valid for every slide.
        valid: (B, K) bool, the slide's real sub-captions (the rest is padding).
        text_key: (B, K) int64, equal for identical texts (a hash of the text).
        """
        b, k, _ = text.shape
        if not bool(valid[:, 0].all()):
            raise ValueError("L_region: every slide needs at least one sub-caption (text[:, 0])")
        negatives, neg_keys, first = self.queries(text, text_key)
        n = negatives.shape[0]
        queries = torch.cat([text, negatives[None].expand(b, n, -1)], dim=1)  # (B, K + N, E)
        region = pool(queries)
        logits = self.log_scale.exp() * (F.normalize(region.float(), dim=-1) * F.normalize(queries.float(), dim=-1)).sum(-1) + self.bias
        own = torch.arange(b, device=text.device)[:, None] + first.to(text.device) == torch.arange(n, device=text.device)[None]
        counted_neg = ~own
        if self.exclude_identical_negatives:
            same = ((text_key[:, :, None] == neg_keys[None, None, :]) & valid[:, :, None]).any(1)
            counted_neg = counted_neg & ~same
        labels = torch.cat([torch.ones(b, k, device=text.device), -torch.ones(b, n, device=text.device)], dim=1)
        counted = torch.cat([valid, counted_neg], dim=1).float()
        per_pair = -F.logsigmoid(labels * logits) * counted
        per_slide = per_pair.sum(1) / counted.sum(1).clamp_min(1.0)
        return {"region": per_slide.mean(), "region/scale": self.log_scale.exp().detach(),
                "region/bias": self.bias.detach()}


class PathFLIPLoss(nn.Module):
    """``weights.slide * L_slide + weights.region * L_region`` (a term with weight 0 is not built)."""

    def __init__(self, weights: Mapping[str, float], slide: Mapping[str, Any] | None = None,
                 region: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        unknown = sorted(set(weights) - set(PATHFLIP_TERMS))
        if unknown:
            raise ValueError(f"pathflip.loss.weights: unknown term(s) {unknown}; known: {list(PATHFLIP_TERMS)}")
        self.weights = {t: float(weights.get(t, 0.0)) for t in PATHFLIP_TERMS}
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError(f"pathflip.loss.weights must be >= 0 with one > 0, got {self.weights}")
        self.terms = nn.ModuleDict()
        if self.weights["slide"]:
            self.terms["slide"] = SlideCaptionLoss(**dict(slide or {}))
        if self.weights["region"]:
            self.terms["region"] = RegionLoss(**dict(region or {}))

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> PathFLIPLoss:
        return cls(section.get("weights", {}), section.get("slide"), section.get("region"))

    def is_active(self, term: str) -> bool:
        return term in self.terms

    def forward(self, inputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Tensor]:
        """``inputs[term]``: the keyword arguments of that term's loss; returns every term's
        outputs and ``loss``, the weighted sum."""
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for term, module in self.terms.items():
            values = module(**inputs[term])
            out.update(values)
            weighted = self.weights[term] * values[term]
            total = weighted if total is None else total + weighted
        assert total is not None
        out["loss"] = total
        return out
