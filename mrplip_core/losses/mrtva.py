"""Multi-resolution text-guided visual representation alignment (MRTVA).

SimSiam between magnifications. The text-guided representations z (output of the
multimodal encoder, one per patch) of two patches x1, x2 of one lineage (x1 an ancestor of
x2: the same tissue at a lower magnification) form a pair. With projector g and predictor h:

    z1 = g(x1), p1 = h(z1)        z2 = g(x2), p2 = h(z2)
    L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,    D(p, z) = -cos(p, z)

``sg`` (stop-gradient, ``detach``) is applied to the *projector outputs used as targets*:
gradient reaches the encoder and g only through the predictor branch p = h(g(x)) of each
term, never through the target g(x) of the other resolution. Both directions are used,
so ancestor and descendant each get gradient (each through its own predictor branch). The
loss is the mean over all given pairs; its range is [-1, 1].

Which pairs (``MRTVALoss(pairs=...)``, config ``pretrain.loss.mrtva.pairs``):

* ``"lineage"`` (default, the paper's sum over resolutions p != c of a lineage): every
  ancestor-descendant pair of a bag, 5x-10x, 5x-20x, 5x-40x, 10x-20x, 10x-40x, 20x-40x,
  so a 40x patch is aligned with its 5x context directly;
* ``"adjacent"``: each patch with its nearest present ancestor only (5x-10x, 10x-20x,
  20x-40x); a 40x patch meets 5x context only through the chain.

Inputs are flat: N representations with ``pairs`` (M, 2) of (ancestor_index,
descendant_index) rows into them, from :func:`parent_child_pairs` (or
:meth:`MRTVALoss.pair_indices`). Any magnification may be absent: a patch's nearest present
ancestor stands in for its parent (e.g. 5x-20x when 10x is left out).
The projector and predictor use BatchNorm as in SimSiam, computed over the rows that
occur in ``pairs`` (padding rows never enter the statistics); convert them with
``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP if per-rank batches are small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def projection_mlp(in_dim: int, out_dim: int, hidden_dim: int | None = None) -> nn.Sequential:
    """SimSiam projector g: 3 linear layers, BN after each (the last one without affine)."""
    hidden_dim = hidden_dim or out_dim
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim, affine=False),
    )


def prediction_mlp(dim: int, hidden_dim: int) -> nn.Sequential:
    """SimSiam predictor h: bottleneck MLP dim -> hidden_dim -> dim."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """D(p, sg(z)) = -cos(p, z.detach()) per row: (M, D), (M, D) -> (M,)."""
    return -F.cosine_similarity(p, z.detach(), dim=-1)


#: Values of ``MRTVALoss(pairs=...)``; the first is the default (the paper's).
PAIR_MODES: tuple[str, ...] = ("lineage", "adjacent")


def parent_child_pairs(parent_index: Tensor, present: Tensor | None = None, *, mode: str) -> Tensor:
    """(M, 2) long rows (ancestor_index, descendant_index) for MRTVA.

    Parameters
    ----------
    parent_index:
        (N,) long, index of each patch's parent in the same flat set, -1 for a root
        (a 5x parent patch).
    present:
        (N,) bool, False for patches to leave out (e.g. a magnification switched off);
        an absent patch is in no pair, and the chain of ancestors passes through it.
    mode:
        ``"lineage"``: a present patch with every present ancestor (5x-10x, 5x-20x,
        5x-40x, ...). ``"adjacent"``: with its nearest present ancestor only.

    Rows come nearest ancestor first: all (parent, child) rows, then grandparents, ...
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"MRTVA pairs must be one of {list(PAIR_MODES)}, got {mode!r}")
    parent_index = parent_index.long()
    num = parent_index.shape[0]
    if present is None:
        present = torch.ones(num, dtype=torch.bool, device=parent_index.device)
    node = torch.arange(num, device=parent_index.device)
    ancestor = parent_index.clone()
    paired = torch.zeros_like(present)  # adjacent: nodes that already have their pair
    found: list[Tensor] = []
    for _ in range(num):  # depth <= num; stops at the roots
        has_ancestor = ancestor >= 0
        if not bool(has_ancestor.any()):
            break
        safe = ancestor.clamp(min=0)
        hit = has_ancestor & present & present[safe] & ~paired
        found.append(torch.stack([ancestor[hit], node[hit]], dim=1))
        if mode == "adjacent":
            paired |= hit
        ancestor = torch.where(has_ancestor, parent_index[safe], ancestor)
    if not found:
        return torch.empty(0, 2, dtype=torch.long, device=parent_index.device)
    return torch.cat(found)


class MRTVALoss(nn.Module):
    """SimSiam loss over ancestor/descendant pairs of text-guided representations.

    Parameters
    ----------
    dim:
        Width of the input representations z.
    proj_dim:
        Output (and hidden) width of the projector g; default ``dim``.
    pred_hidden_dim:
        Bottleneck of the predictor h; default ``proj_dim // 4`` (SimSiam: 2048 / 512).
    pairs:
        ``"lineage"`` (default, the paper's) or ``"adjacent"``: which pairs
        :meth:`pair_indices` draws (see the module docstring).
    """

    name = "mrtva"

    def __init__(
        self,
        dim: int,
        proj_dim: int | None = None,
        pred_hidden_dim: int | None = None,
        pairs: str = "lineage",
    ) -> None:
        super().__init__()
        if pairs not in PAIR_MODES:
            raise ValueError(f"pairs must be one of {list(PAIR_MODES)}, got {pairs!r}")
        self.pair_mode = pairs
        proj_dim = proj_dim or dim
        self.projector = projection_mlp(dim, proj_dim)
        self.predictor = prediction_mlp(proj_dim, pred_hidden_dim or max(proj_dim // 4, 1))

    def pair_indices(self, parent_index: Tensor, present: Tensor | None = None) -> Tensor:
        """The (M, 2) pairs of this loss's mode over flat patches (:func:`parent_child_pairs`)."""
        return parent_child_pairs(parent_index, present, mode=self.pair_mode)

    def forward(
        self, z: Tensor, pairs: Tensor, magnification: Tensor | None = None
    ) -> dict[str, Tensor]:
        """MRTVA over the given pairs.

        Parameters
        ----------
        z:
            (N, dim) text-guided visual representations (all magnifications, flat).
        pairs:
            (M, 2) long (ancestor_index, descendant_index) rows into ``z``.
        magnification:
            Optional (N,) magnification of each row (5, 10, 20, 40); adds detached
            per-pair-type means ``"mrtva/5x-10x"``, ``"mrtva/5x-40x"`` etc. for logging.

        Returns
        -------
        ``{"mrtva": mean over pairs of D(p1, sg(z2))/2 + D(p2, sg(z1))/2, ...}``.
        """
        if pairs.numel() == 0:
            return {"mrtva": z.sum() * 0.0}
        used, local = torch.unique(pairs, return_inverse=True)  # BN sees only paired rows
        projected = self.projector(z[used])
        predicted = self.predictor(projected)
        parent, child = local[:, 0], local[:, 1]
        per_pair = (
            negative_cosine(predicted[parent], projected[child]) / 2
            + negative_cosine(predicted[child], projected[parent]) / 2
        )
        out = {"mrtva": per_pair.mean()}
        if magnification is not None:
            out.update(self._per_magnification(per_pair.detach(), pairs, magnification))
        return out

    @staticmethod
    def _per_magnification(
        per_pair: Tensor, pairs: Tensor, magnification: Tensor
    ) -> dict[str, Tensor]:
        """Mean of ``per_pair`` for each (ancestor magnification, descendant magnification)."""
        levels = magnification[pairs].tolist()
        groups: dict[str, list[int]] = {}
        for row, (parent_mag, child_mag) in enumerate(levels):
            groups.setdefault(f"mrtva/{parent_mag:g}x-{child_mag:g}x", []).append(row)
        return {
            key: per_pair[torch.tensor(rows, device=per_pair.device)].mean()
            for key, rows in sorted(groups.items())
        }
