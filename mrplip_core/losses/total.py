"""The MR-PLIP objective: L = L_bl + L_CVTA + L_MRTVA, L_bl = ITC + ITM + MLM + PLM.

Each term is weighted (``weights``, default 1.0); a term with weight 0 or without a module
is *inactive*: it is neither built nor computed, and its inputs are not needed. The
trainer asks :meth:`MRPLIPLoss.is_active` before running the model branch that feeds a
term (e.g. the MLM forward pass), then calls the loss with one mapping of keyword
arguments per active term.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mrplip_core.losses.cvta import CVTALoss
from mrplip_core.losses.itc import ITCLoss
from mrplip_core.losses.itm import ITMLoss
from mrplip_core.losses.mlm import MLMLoss
from mrplip_core.losses.mrtva import MRTVALoss
from mrplip_core.losses.plm import PLMLoss
from mrplip_core.model.terms import BASELINE_TERMS, TERMS


def _check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown}; known: {list(TERMS)}")
    resolved = {name: float(weights.get(name, 1.0)) for name in TERMS}
    negative = [name for name, weight in resolved.items() if weight < 0]
    if negative:
        raise ValueError(f"loss weights must be >= 0, got negative for {negative}")
    return resolved


class MRPLIPLoss(nn.Module):
    """Weighted sum of the six MR-PLIP terms.

    Parameters
    ----------
    terms:
        Loss module per term name (``"itc"``, ``"itm"``, ``"mlm"``, ``"plm"``,
        ``"cvta"``, ``"mrtva"``); a missing or None module disables the term.
    weights:
        Weight per term name (missing names weigh 1.0; 0 disables the term).
    """

    def __init__(
        self, terms: Mapping[str, nn.Module | None], weights: Mapping[str, float] | None = None
    ) -> None:
        super().__init__()
        unknown = sorted(set(terms) - set(TERMS))
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}; known: {list(TERMS)}")
        self.weights = _check_weights(weights or {})
        self.terms = nn.ModuleDict(
            {
                name: module
                for name, module in terms.items()
                if module is not None and self.weights[name] > 0
            }
        )

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, fusion_dim: int, representation_dim: int
    ) -> MRPLIPLoss:
        """Build from the ``loss`` section of the config (see :data:`DEFAULT_CONFIG`).

        ``fusion_dim`` is the pooled width of the multimodal encoder (ITM head input);
        ``representation_dim`` the width of the text-guided representations z (MRTVA).
        Inactive terms are not built.
        """
        weights = _check_weights(config.get("weights", {}))
        section = {name: dict(config.get(name) or {}) for name in TERMS}
        builders = {
            "itc": lambda c: ITCLoss(**c),
            "itm": lambda c: ITMLoss(fusion_dim, **c),
            "mlm": lambda c: MLMLoss(),  # its section configures data.lm_inputs.mask_tokens
            "plm": lambda c: PLMLoss(),  # its section configures data.lm_inputs.make_prefix_lm_batch
            "cvta": lambda c: CVTALoss(**c),
            "mrtva": lambda c: MRTVALoss(representation_dim, **c),
        }
        terms = {}
        for name in TERMS:
            if weights[name] > 0:
                try:
                    terms[name] = builders[name](section[name])
                except TypeError as error:  # an unknown or misspelt key
                    raise ValueError(f"loss.{name}: {error}") from error
        return cls(terms, weights)

    @property
    def active_terms(self) -> tuple[str, ...]:
        """Names of the terms that are computed, in canonical order."""
        return tuple(name for name in TERMS if name in self.terms)

    def is_active(self, name: str) -> bool:
        """True if ``name`` is computed (the trainer skips the feeding branch otherwise)."""
        return name in self.terms

    def forward(self, inputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Tensor]:
        """Compute every active term.

        Parameters
        ----------
        inputs:
            Keyword arguments of each active term's ``forward``, by term name; entries for
            inactive terms are ignored.

        Returns
        -------
        Every active term's dict (unweighted ``"itc"``, ..., plus their detached
        diagnostics such as ``"itc/temperature"``), ``"loss_bl"`` (weighted sum of the
        active baseline terms; present when one is active) and ``"loss"`` (the weighted
        total to backpropagate).
        """
        missing = [name for name in self.active_terms if name not in inputs]
        if missing:
            raise KeyError(f"no inputs for active loss term(s) {missing}")
        out: dict[str, Tensor] = {}
        weighted: dict[str, Tensor] = {}
        for name in self.active_terms:
            term = self.terms[name](**inputs[name])
            out.update(term)
            weighted[name] = self.weights[name] * term[name]
        if not weighted:
            raise ValueError("every loss term is disabled")
        baseline = [weighted[name] for name in BASELINE_TERMS if name in weighted]
        if baseline:
            out["loss_bl"] = torch.stack(baseline).sum()
        out["loss"] = torch.stack(list(weighted.values())).sum()
        return out


DEFAULT_CONFIG: dict[str, Any] = {
    # weight of each term in L = L_bl + L_CVTA + L_MRTVA; 0 switches a term off
    "weights": {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "plm": 1.0, "cvta": 1.0, "mrtva": 1.0},
    # ITCLoss kwargs; for multi-GPU DDP prefer local_loss + gather_with_grad (itc.py)
    "itc": {
        "init_temperature": 0.07,
        "max_logit_scale": 100.0,
        "local_loss": False,
        "gather_with_grad": False,
    },
    # ITMLoss kwargs besides the fusion width (none by default)
    "itm": {},
    # data.lm_inputs.mask_tokens kwargs, used by the dataset (MLMLoss itself has no settings)
    "mlm": {"mask_prob": 0.15, "mask_token_frac": 0.8, "random_token_frac": 0.1},
    # data.lm_inputs.make_prefix_lm_batch kwargs, used by the dataset (PLMLoss has no settings)
    "plm": {"min_prefix": 1},
    # CVTALoss kwargs; denominator: all_keywords (the paper's) | negatives_only
    "cvta": {
        "k_o": 5,
        "init_temperature": 0.07,
        "max_logit_scale": 100.0,
        "denominator": "all_keywords",
    },
    # MRTVALoss kwargs besides the input width; None = SimSiam-style defaults;
    # pairs: lineage (every ancestor-descendant pair, the paper's) | adjacent
    "mrtva": {"proj_dim": None, "pred_hidden_dim": None, "pairs": "lineage"},
}
"""Defaults of the ``loss`` config section, as accepted by :meth:`MRPLIPLoss.from_config`."""
