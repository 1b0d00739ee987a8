"""Step 2 of the conversion: the llava-hf model a source checkpoint becomes.

:func:`plan_target` adds the ``<image>`` token to the tokenizer, pads the vocabulary, builds
the ``LlavaConfig`` (vision config from the tower, LLaMA text config from the checkpoint)
and checks that the mapped weights are exactly the target model's, names and shapes, before
anything is written. :func:`convert_tensor` turns one source tensor into the target's dtype
and vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mrplip_core.convert_llava.errors import ConversionError
from mrplip_core.convert_llava.read import LlavaSource

IMAGE_TOKEN = "<image>"
#: Weights with one row per vocabulary entry (padded with the mean row).
VOCAB_ROWS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")

#: config.json keys of original LLaVA that are not LLaMA settings.
_LLAVA_ONLY_KEYS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
    "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
    "use_mm_proj", "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "unfreeze_mm_vision_tower",
    "mm_projector_lr", "mm_vision_tower_lr", "use_cache", "auto_map",
}


@dataclass
class LlavaTarget:
    """The HF ``LlavaForConditionalGeneration`` to write."""

    config: Any  # LlavaConfig, architectures and dtype set
    tokenizer: Any  # the source's tokenizer with <image> added (the same object)
    image_token_index: int
    vocab_size: int  # after adding <image> and padding
    dtype: str  # float16, bfloat16 or float32
    expected: dict[str, tuple[int, ...]]  # llava-hf name -> shape of every weight of the model


def plan_target(source: LlavaSource, *, dtype: str | None = None, pad_vocab_multiple: int = 64) -> LlavaTarget:
    """The target of ``source``; raises :class:`ConversionError` when its weights would not fit.

    ``dtype``: output dtype (default: the source's ``torch_dtype``, else float16);
    ``pad_vocab_multiple``: embedding rows are padded to a multiple of this (llava-hf uses 64).
    """
    from transformers import AddedToken, LlavaConfig

    cfg, vcfg, tok = source.config, source.vision_config, source.tokenizer
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = max(source.shapes["language_model.model.embed_tokens.weight"][0], len(tok))
    if pad_vocab_multiple > 1:
        vocab = -(-vocab // pad_vocab_multiple) * pad_vocab_multiple

    n_img = (vcfg.image_size // vcfg.patch_size) ** 2
    select = cfg.get("mm_vision_select_feature", "patch")
    out_dtype = dtype or cfg.get("torch_dtype") or "float16"
    config = LlavaConfig(
        vision_config=vcfg.to_dict(), text_config=_text_config(cfg, vocab).to_dict(), image_token_index=image_id,
        image_seq_length=n_img if select == "patch" else n_img + 1,
        vision_feature_select_strategy="default" if select == "patch" else "full",
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)), projector_hidden_act="gelu",
        multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = out_dtype

    shapes = dict(source.shapes)
    for k in VOCAB_ROWS:
        if k in shapes:
            shapes[k] = (vocab, *shapes[k][1:])
    expected = _expected_shapes(config)
    _check_shapes(expected, shapes)
    return LlavaTarget(config=config, tokenizer=tok, image_token_index=image_id, vocab_size=vocab, dtype=out_dtype,
                       expected=expected)


def convert_tensor(name: str, value: Any, target: LlavaTarget) -> Any:
    """One source tensor (under its llava-hf ``name``) in the target's dtype; vocabulary rows
    padded to ``target.vocab_size`` with their mean."""
    import torch

    dtype = getattr(torch, target.dtype)
    v = value.to(dtype)
    if name in VOCAB_ROWS and v.shape[0] < target.vocab_size:
        mean = v.float().mean(dim=0, keepdim=True).to(dtype)
        v = torch.cat([v, mean.expand(target.vocab_size - v.shape[0], -1)], dim=0)
    return v.contiguous()


def _text_config(cfg: dict[str, Any], vocab_size: int) -> Any:
    from transformers import LlamaConfig

    keep = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in _LLAVA_ONLY_KEYS}
    keep["vocab_size"] = vocab_size
    if keep.get("rope_scaling") is None:
        keep.pop("rope_scaling", None)  # LLaMA-2 releases write null
    return LlamaConfig(**keep)


def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Classic (llava-hf) names and shapes of every weight of the target model."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k.startswith("model.vision_tower."):
            k = "vision_tower.vision_model." + k[len("model.vision_tower."):]
        elif k.startswith("model.multi_modal_projector."):
            k = k[len("model."):]
        elif k.startswith("lm_head."):
            k = "language_model." + k
        out[k] = tuple(v.shape)
    return out


def _check_shapes(expected: dict[str, tuple[int, ...]], mapped: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    wrong = sorted(k for k in set(expected) & set(mapped) if tuple(expected[k]) != tuple(mapped[k]))
    if missing or extra or wrong:
        raise ConversionError(
            "the weights do not match the target model: "
            + "; ".join(f"{name}: {v[:5]}{' ...' if len(v) > 5 else ''}"
                        for name, v in (("missing", missing), ("unexpected", extra),
                                        ("shape mismatch", [f"{k} {mapped[k]} != {expected[k]}" for k in wrong]))
                        if v))
