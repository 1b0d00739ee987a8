"""Image-text contrastive loss (ITC) with in-batch and cross-rank negatives.

Every rank holds B pairs; with W ranks the global batch has N = W * B pairs and every
pair sees the N - 1 others as negatives. All ranks must hold the same B (the gather is an
``all_gather`` of equal shapes): use ``drop_last=True`` in the data loader.

Two distributed modes (``local_loss``); both give the single-process loss and gradient,
with different scales, stated here because the trainer depends on it:

``local_loss=False`` (default; open_clip's ``gather_features`` with ``local_loss=False``)
    Features from all ranks are gathered without gradient and the gathered copy of the
    own rank is replaced by the local tensor, so autograd reaches the local features.
    Every rank computes the full N x N logits and labels ``arange(N)``.
    * The loss value on every rank equals the single-process loss on the concatenated
      batch.
    * The gradient w.r.t. the local features equals the matching rows of the
      single-process gradient.
    * DDP then *averages* parameter gradients over ranks, so encoder parameters receive
      ``1/W`` of the single-process gradient while the logit scale (same value on every
      rank) receives all of it. Next to other terms that are per-rank means (MLM, CVTA,
      MRTVA, ...), ITC therefore weighs ``1/W`` as much under DDP; scale its weight by W
      or use the other mode.

``local_loss=True, gather_with_grad=True``
    Each rank computes only its own B rows against all N columns (B x N logits, labels
    offset by ``rank * B``); the gather is differentiable, so gradients from other
    ranks' rows flow back.
    * The mean over ranks of the loss equals the single-process loss.
    * The gradient w.r.t. the local features is ``W`` times the matching rows of the
      single-process gradient (every rank contributes), so after DDP's average over ranks
      parameters receive exactly the single-process gradient, same as for per-rank-mean
      losses. Memory is O(B x N) instead of O(N x N). Recommended for multi-GPU runs.

``local_loss=True, gather_with_grad=False`` is allowed (open_clip allows it) but its
gradient misses the terms where local features act as negatives in other ranks' rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mrplip_core.losses.temperature import LogitScale


def _rank_and_world_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradients of all ranks.

    Backward all-reduces the full (W * B, D) gradient and keeps the own rank's rows: only
    public collectives that gloo and NCCL both support (``torch.distributed.nn``'s gather
    is deprecated and needs reduce-scatter or all-to-all); the extra traffic is negligible
    for (N, D) embeddings.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        rank, world_size = _rank_and_world_size(group)
        ctx.group, ctx.rows = group, slice(rank * tensor.shape[0], (rank + 1) * tensor.shape[0])
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor.contiguous(), group=group)
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rows], None


def gather_features(
    image_features: Tensor,
    text_features: Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Concatenate the (B, D) features of all ranks into (W * B, D), rank order.

    Without ``gather_with_grad`` the gathered tensors carry no gradient except, when
    ``local_loss`` is False, the own rank's block, which is the local tensor itself.
    With a single process the inputs are returned unchanged.
    """
    rank, world_size = _rank_and_world_size(group)
    if world_size == 1:
        return image_features, text_features
    if gather_with_grad:
        return (
            _AllGatherWithGrad.apply(image_features, group),
            _AllGatherWithGrad.apply(text_features, group),
        )
    gathered_image = [torch.zeros_like(image_features) for _ in range(world_size)]
    gathered_text = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_image, image_features.contiguous(), group=group)
    dist.all_gather(gathered_text, text_features.contiguous(), group=group)
    if not local_loss:
        # all_gather returns copies without autograd history: put the local tensors back
        gathered_image[rank] = image_features
        gathered_text[rank] = text_features
    return torch.cat(gathered_image, dim=0), torch.cat(gathered_text, dim=0)


class ITCLoss(nn.Module):
    """Symmetric InfoNCE between L2-normalised image and text embeddings.

    ``loss = (CE(logits_per_image, labels) + CE(logits_per_text, labels)) / 2`` with
    ``logits = (1 / tau) * cos`` and a learnable tau (CLIP parametrisation, see
    :class:`LogitScale`). The temperature lives in this module: give its parameters to the
    optimiser (and to DDP when ``local_loss=True``, where per-rank gradients differ).

    Parameters
    ----------
    init_temperature:
        Initial tau.
    max_logit_scale:
        Clamp of ``1 / tau``.
    learn_temperature:
        False keeps tau fixed.
    local_loss, gather_with_grad:
        Distributed mode; see the module docstring for the exact gradient scales.
    group:
        Process group of the gather (default: the world).
    """

    name = "itc"

    def __init__(
        self,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        learn_temperature: bool = True,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.logit_scale = LogitScale(init_temperature, max_logit_scale, learn_temperature)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.group = group

    def get_ground_truth(self, num_rows: int, device: torch.device) -> Tensor:
        """Index of the positive column of each row: (num_rows,) long."""
        labels = torch.arange(num_rows, device=device)
        rank, world_size = _rank_and_world_size(self.group)
        if world_size > 1 and self.local_loss:
            labels = labels + num_rows * rank
        return labels

    def get_logits(self, image_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled cosine logits from normalised (B, D) features.

        Returns ``(logits_per_image, logits_per_text)``, each (B, N) with ``local_loss``
        and (N, N) otherwise.
        """
        all_image, all_text = gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            group=self.group,
        )
        scale = self.logit_scale()
        if self.local_loss:
            return scale * image_features @ all_text.T, scale * text_features @ all_image.T
        logits_per_image = scale * all_image @ all_text.T
        return logits_per_image, logits_per_image.T

    @torch.no_grad()
    def similarity(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Local scaled cosine similarities (B, B), no gradient: ITM mines negatives here."""
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        return self.logit_scale() * image_features @ text_features.T

    def forward(self, image_features: Tensor, text_features: Tensor) -> dict[str, Tensor]:
        """ITC over the global batch.

        Parameters
        ----------
        image_features, text_features:
            (B, D) embeddings of B matching pairs (row i of one matches row i of the
            other); normalised here.

        Returns
        -------
        ``{"itc": loss, "itc/temperature": tau}``; the temperature is detached (logging).
        """
        if image_features.shape != text_features.shape or image_features.dim() != 2:
            raise ValueError(
                "image_features and text_features must both be (B, D), got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features)
        labels = self.get_ground_truth(logits_per_image.shape[0], logits_per_image.device)
        loss = (
            F.cross_entropy(logits_per_image.float(), labels)
            + F.cross_entropy(logits_per_text.float(), labels)
        ) / 2
        return {"itc": loss, "itc/temperature": (1.0 / self.logit_scale()).detach()}
