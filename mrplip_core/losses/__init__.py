"""The MR-PLIP training objective, one small module per term.

``L = L_bl + L_CVTA + L_MRTVA`` with ``L_bl = ITC + ITM + MLM + PLM``; every term is an
``nn.Module`` whose ``forward`` returns a dict of named tensors (the term under its own
name, plus detached diagnostics), combined by :class:`MRPLIPLoss`.
"""

from mrplip_core.losses.cvta import (
    CVTALoss,
    TopKKeywords,
    cosine_similarity_matrix,
    select_topk_keywords,
)
from mrplip_core.losses.itc import ITCLoss, gather_features
from mrplip_core.losses.itm import FuseFn, ITMLoss, sample_hard_negatives
from mrplip_core.losses.mlm import IGNORE_INDEX, MaskedTokens, MLMLoss, mask_tokens
from mrplip_core.losses.mrtva import (
    MRTVALoss,
    negative_cosine,
    parent_child_pairs,
    prediction_mlp,
    projection_mlp,
)
from mrplip_core.losses.plm import (
    PLMLoss,
    PrefixLMBatch,
    make_prefix_lm_batch,
    prefix_lm_attention_mask,
)
from mrplip_core.losses.temperature import LogitScale
from mrplip_core.losses.total import DEFAULT_CONFIG, TERMS, MRPLIPLoss

__all__ = [
    "DEFAULT_CONFIG",
    "IGNORE_INDEX",
    "TERMS",
    "CVTALoss",
    "FuseFn",
    "ITCLoss",
    "ITMLoss",
    "LogitScale",
    "MLMLoss",
    "MRPLIPLoss",
    "MRTVALoss",
    "MaskedTokens",
    "PLMLoss",
    "PrefixLMBatch",
    "TopKKeywords",
    "cosine_similarity_matrix",
    "gather_features",
    "make_prefix_lm_batch",
    "mask_tokens",
    "negative_cosine",
    "parent_child_pairs",
    "prediction_mlp",
    "prefix_lm_attention_mask",
    "projection_mlp",
    "sample_hard_negatives",
    "select_topk_keywords",
]
