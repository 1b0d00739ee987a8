"""The image tower of CONCH v1 (MahmoodLab/CONCH, ``conch_ViT-B-16``): a CoCa vision encoder.

Layout, as MahmoodLab/CONCH's code builds it (``open_clip_custom/coca_model.py`` and
``vision_tower.py``) and as its released ``pytorch_model.bin`` stores it under ``visual.``:

- ``trunk``: timm's ``VisionTransformer`` (ViT-B/16: width 768, 12 blocks, 12 heads, MLP
  ratio 4, class token, final LayerNorm, no head) at 448 px, i.e. 28 x 28 patches;
- ``attn_pool_contrast``: one learned 512-d query attends (8 heads) over all 785 output
  tokens of the trunk, class token included; keys and values are 768-d, so the attention
  keeps separate q/k/v projection matrices;
- ``ln_contrast`` then ``proj_contrast`` (512 x 512, applied as ``x @ proj_contrast``).

``forward`` returns that projected 512-d embedding, not L2-normalised: CONCH's
``encode_image(img, proj_contrast=True, normalize=False)``. The release also holds a second
pooler (``attn_pool_caption``, ``ln_caption``, 256 queries) that only feeds the captioning
decoder, whose weights were not released; it is not built here (its keys are the catalog's
``CONCH_CAPTION_POOLER_KEYS``, dropped on loading).

Key names and shapes follow that code; they were not checked against the gated file itself.
"""

from __future__ import annotations

import torch
from torch import nn

class AttentionalPooler(nn.Module):
    """Learned queries attending over a sequence of tokens: (B, L, context_dim) -> (B, Q, dim).

    Queries and tokens are each layer-normalised first (``ln_q``, ``ln_k``); the attention is
    ``nn.MultiheadAttention`` with key/value width ``context_dim``.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, num_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(num_queries, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        nn.init.normal_(self.query)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        context = self.ln_k(tokens)
        queries = self.ln_q(self.query).expand(tokens.shape[0], -1, -1)
        return self.attn(queries, context, context, need_weights=False)[0]


class ConchImageTower(nn.Module):
    """CONCH's image tower: normalised (B, 3, img_size, img_size) -> (B, embed_dim) contrastive embedding.

    Parameters
    ----------
    img_size, patch_size: input side and patch side in px (448 and 16 for CONCH v1); other
        input sides also run (timm's ``dynamic_img_size`` interpolates the position embedding).
    width, depth, num_heads, mlp_ratio: the ViT trunk (768, 12, 12, 4).
    embed_dim: width of the contrastive pooler and of the output (512).
    pooler_heads: attention heads of the pooler (8).
    """

    def __init__(
        self,
        img_size: int = 448,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        embed_dim: int = 512,
        pooler_heads: int = 8,
    ) -> None:
        from timm.models.vision_transformer import VisionTransformer

        super().__init__()
        self.trunk = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=width,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(embed_dim, width, pooler_heads, num_queries=1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(torch.empty(embed_dim, embed_dim))
        nn.init.normal_(self.proj_contrast, std=embed_dim**-0.5)
        #: Output length, under the attribute name timm models use (read by load_image_encoder).
        self.num_features = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # (B, 1 + patches, width), after the final norm
        pooled = self.attn_pool_contrast(tokens)[:, 0]  # the single query's output
        return self.ln_contrast(pooled) @ self.proj_contrast
