"""The MR-PLIP training objective, one small module per term.

``L = L_bl + L_CVTA + L_MRTVA`` with ``L_bl = ITC + ITM + MLM + PLM``; every term is an
``nn.Module`` whose ``forward`` returns a dict of named tensors (the term under its own
name, plus detached diagnostics), combined by :class:`MRPLIPLoss`.

The inputs of the language-model terms (masked captions, prefix-LM labels) are drawn by the
dataset (:mod:`mrplip_core.data.lm_inputs`); the term names live in
:mod:`mrplip_core.model.terms`.
"""

from mrplip_core.losses.cvta import (
    DENOMINATORS,
    CVTALoss,
    TopKKeywords,
    cosine_similarity_matrix,
    select_topk_keywords,
)
from mrplip_core.losses.itc import ITCLoss, gather_features
from mrplip_core.losses.itm import FuseFn, ITMLoss, sample_hard_negatives
from mrplip_core.losses.mlm import MLMLoss
from mrplip_core.losses.mrtva import (
    PAIR_MODES,
    MRTVALoss,
    negative_cosine,
    parent_child_pairs,
    prediction_mlp,
    projection_mlp,
)
from mrplip_core.losses.plm import PLMLoss
from mrplip_core.losses.temperature import LogitScale
from mrplip_core.losses.total import DEFAULT_CONFIG, TERMS, MRPLIPLoss

__all__ = [
    "DEFAULT_CONFIG",
    "DENOMINATORS",
    "PAIR_MODES",
    "TERMS",
    "CVTALoss",
    "FuseFn",
    "ITCLoss",
    "ITMLoss",
    "LogitScale",
    "MLMLoss",
    "MRPLIPLoss",
    "MRTVALoss",
    "PLMLoss",
    "TopKKeywords",
    "cosine_similarity_matrix",
    "gather_features",
    "negative_cosine",
    "parent_child_pairs",
    "prediction_mlp",
    "projection_mlp",
    "sample_hard_negatives",
    "select_topk_keywords",
]
