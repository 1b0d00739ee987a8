"""One forward pass of MR-PLIP pretraining: the model branches that feed each active
loss term, and the weighted total from :class:`mrplip_core.losses.MRPLIPLoss`.

A batch holds B bags of P patches each (see :mod:`mrplip_core.data.dataset`); the N = B*P
patches are the image-caption pairs of ITC/ITM/MLM/PLM, the bags are CVTA's visual and
textual bags, and the drawn parent/child links give MRTVA's pairs.

Branch per term (skipped when the term is off):

* ITC: image embedding of every patch vs. the embedding of its caption.
* ITM: fusion of (patch, caption) for the N positives and 2N hard negatives mined from
  ITC similarities (or plain cosine when ITC is off); identical captions in the batch are
  never drawn as each other's negatives.
* MLM: the corrupted captions through the text encoder and the fusion; logits only at
  the masked positions (the loss is the same, memory is ~7 x smaller).
* PLM: the prefix-LM decoder; logits only at positions whose next token is labelled.
* CVTA: patch embeddings vs. keyword embeddings of the same bag.
* MRTVA: z = E_mm(visual token, its top-k_o keywords by cosine in the CVTA space), pairs
  from the drawn parent links, as the MRTVA term's ``pairs`` setting says (lineage: every
  ancestor-descendant pair, 5x-20x, 5x-40x, ... included; adjacent: parent-child only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrplip_core.data.lm_inputs import IGNORE_INDEX
from mrplip_core.losses import MRPLIPLoss, cosine_similarity_matrix, select_topk_keywords
from mrplip_core.model.mrplip import MRPLIPModel


def duplicate_pairs(input_ids: Tensor) -> Tensor:
    """(N, N) bool, True where two captions have identical token ids (never negatives).

    When every caption of the batch is the same, only the diagonal is excluded (ITM then
    has no true negative, but still runs).
    """
    _, label = torch.unique(input_ids, dim=0, return_inverse=True)
    same = label[:, None] == label[None, :]
    if bool(same.all()):
        return torch.eye(len(label), dtype=torch.bool, device=input_ids.device)
    return same


class MRPLIPObjective(nn.Module):
    """Model + loss in one module (what DDP wraps).

    Parameters
    ----------
    model: the MR-PLIP model.
    loss: the combined loss (its active terms decide which branches run; the MRTVA term
        decides which pairs it aligns).
    log_pair_types: also return MRTVA per magnification pair ("mrtva/5x-10x", ...); costs
        one device-to-host copy per step.
    """

    def __init__(self, model: MRPLIPModel, loss: MRPLIPLoss, *, log_pair_types: bool = True) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.log_pair_types = log_pair_types

    def forward(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Losses of one batch (already on the model's device); see the module docstring."""
        m, active = self.model, self.loss.is_active
        b, p = batch["features"].shape[:2]
        n = b * p
        flat_ids = batch["input_ids"].reshape(n, -1)
        flat_mask = batch["attention_mask"].reshape(n, -1)
        tokens = m.visual_tokens(batch["features"].reshape(n, -1), batch["level"].reshape(n))
        image = m.image_embedding(tokens)
        inputs: dict[str, dict[str, Any]] = {}

        states = text = None
        if active("itc") or active("itm"):
            states = m.text_states(flat_ids, flat_mask)
            text = m.text_embedding(states, flat_mask)
        if active("itc"):
            inputs["itc"] = {"image_features": image, "text_features": text}
        if active("itm"):
            with torch.no_grad():
                if active("itc"):
                    sim = self.loss.terms["itc"].similarity(image.float(), text.float())
                else:
                    sim = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / 0.07
            inputs["itm"] = {
                "fuse": m.fuse, "image_tokens": tokens[:, None], "text_tokens": states, "text_mask": flat_mask,
                "sim_i2t": sim, "exclude": duplicate_pairs(flat_ids), "generator": generator,
            }
        if active("mlm"):
            labels = batch["mlm_labels"].reshape(n, -1)
            corrupted = m.text_states(batch["mlm_input_ids"].reshape(n, -1), flat_mask)
            fused = m.fuse_tokens(tokens[:, None], corrupted, flat_mask)
            picked = labels != IGNORE_INDEX
            inputs["mlm"] = {"logits": m.mlm_logits(fused[picked])[None], "labels": labels[picked][None]}
        if active("plm"):
            labels = batch["plm_labels"].reshape(n, -1)
            decoded = m.decode(flat_ids, flat_mask, batch["plm_prefix"].reshape(n), tokens[:, None])
            target = labels[:, 1:]
            picked = target != IGNORE_INDEX
            logits = m.plm_logits(decoded[:, :-1][picked])  # position t predicts token t + 1
            # PLMLoss shifts by one: hand it (M, 2) rows whose 2nd label is the target
            pair_labels = torch.stack([torch.full_like(target[picked], IGNORE_INDEX), target[picked]], dim=1)
            inputs["plm"] = {"logits": logits[:, None].expand(-1, 2, -1), "labels": pair_labels}
        if active("cvta") or active("mrtva"):
            keyword_mask = batch["keyword_mask"]
            keywords = m.keyword_embedding(batch["keyword_features"])
            visual = image.reshape(b, p, -1)
        if active("cvta"):
            # fp32 cosines: bf16 (autocast) would round similarities to ~1e-2 before the top-k
            inputs["cvta"] = {"visual": visual.float(), "keywords": keywords.float(), "keyword_mask": keyword_mask}
        if active("mrtva"):
            with torch.no_grad():
                similarity = cosine_similarity_matrix(visual.float(), keywords.float(), None, keyword_mask)
                top = select_topk_keywords(similarity, m.keyword_top_k, keyword_mask)
            k = top.indices.shape[-1]
            keyword_tokens = m.keyword_tokens(batch["keyword_features"].to(tokens.dtype))  # (B, K, H)
            gathered = torch.gather(
                keyword_tokens[:, None].expand(b, p, *keyword_tokens.shape[1:]), 2,
                top.indices[..., None].expand(b, p, k, keyword_tokens.shape[-1]),
            )
            z = m.text_guided(tokens, gathered.reshape(n, k, -1), top.valid.reshape(n, k))
            parent = batch["parent"]
            offset = torch.arange(b, device=parent.device)[:, None] * p
            flat_parent = torch.where(parent >= 0, parent + offset, parent).reshape(n)
            pairs = self.loss.terms["mrtva"].pair_indices(flat_parent)
            inputs["mrtva"] = {"z": z, "pairs": pairs}
            if self.log_pair_types:
                inputs["mrtva"]["magnification"] = batch["magnification"].reshape(n)
        return self.loss(inputs)
