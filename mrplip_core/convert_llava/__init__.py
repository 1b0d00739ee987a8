"""Convert an original-format LLaVA-1.5 checkpoint (e.g. Quilt-LLaVA) to HF ``LlavaForConditionalGeneration``.

The original release format (``haotian-liu/LLaVA`` training code, used by Quilt-LLaVA):

- ``config.json``: ``architectures: [LlavaLlamaForCausalLM]``, LLaMA keys plus ``mm_vision_tower``
  (a hub id or path of an HF CLIP model), ``mm_hidden_size``, ``mm_projector_type``
  (``mlp2x_gelu``), ``mm_vision_select_layer``, ``mm_vision_select_feature``,
  ``image_aspect_ratio``, ``mm_use_im_start_end``, ...;
- weights (``pytorch_model-*.bin`` or ``*.safetensors``, optionally sharded with an index):
  ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``,
  ``model.mm_projector.{0,2}.*`` and, when the tower was trained, ``model.vision_tower.vision_tower.*``;
- the vision tower itself usually lives in its own HF CLIP folder (``mm_vision_tower``).

The output is the llava-hf layout that both ``transformers`` and vLLM load
(``language_model.model.*``, ``language_model.lm_head``, ``vision_tower.vision_model.*``,
``multi_modal_projector.linear_{1,2}.*``), with an ``<image>`` token added to the tokenizer,
the vision config read from the tower's own ``config.json`` (so a QuiltNet ViT-B/32 at
224 px converts as such; nothing is assumed about CLIP-L/336), a LLaVA-1.5 (vicuna_v1) chat
template that starts with the BOS token (vLLM adds none to chat prompts), and a processor.

What cannot be expressed by ``LlavaForConditionalGeneration`` is refused with a
:class:`ConversionError` that says why: other language models, projector types other than
``mlp2x_gelu``, ``mm_use_im_start_end``, ``anyres`` / spatial patch merging (LLaVA-NeXT),
non-CLIP towers, and any weight the mapping does not account for. Before anything is
written the mapping is checked to produce exactly the weights (names and shapes) the target
model has.

Three steps, one module each, run in order by :func:`convert_llava` (``mrplip convert-llava``,
:mod:`~mrplip_core.convert_llava.cli`):

1. :func:`~mrplip_core.convert_llava.read.read_source`: config checks, weight names and
   shapes mapped to llava-hf names, the vision tower, the tokenizer;
2. :func:`~mrplip_core.convert_llava.convert.plan_target`: the ``<image>`` token, the padded
   vocabulary, the ``LlavaConfig``, and the check against the target model's weights;
3. :func:`~mrplip_core.convert_llava.write.write_hf`: weights streamed into shards, configs,
   processor, ``mrplip_conversion.json``, all renamed into place at the end.

A tool that prepares the captioning model, not a pipeline stage: it imports nothing else of
``mrplip_core``.
"""

from __future__ import annotations

from pathlib import Path

from mrplip_core.convert_llava.convert import LlavaTarget, plan_target
from mrplip_core.convert_llava.errors import ConversionError
from mrplip_core.convert_llava.read import LlavaSource, map_key, read_source
from mrplip_core.convert_llava.write import LLAVA_V1_CHAT_TEMPLATE, ConversionReport, check_destination, write_hf

__all__ = [
    "LLAVA_V1_CHAT_TEMPLATE",
    "ConversionError",
    "ConversionReport",
    "LlavaSource",
    "LlavaTarget",
    "convert_llava",
    "map_key",
    "plan_target",
    "read_source",
    "write_hf",
]


def convert_llava(
    src: str | Path,
    dst: str | Path,
    *,
    vision_tower: str | Path | None = None,
    dtype: str | None = None,
    pad_vocab_multiple: int = 64,
    chat_template: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert the original-format LLaVA checkpoint ``src`` into an HF folder ``dst``.

    Parameters
    ----------
    vision_tower: local HF CLIP folder of the tower, when ``mm_vision_tower`` names a hub id
        that is neither a local path nor in the local HF cache.
    dtype: output dtype (float16, bfloat16, float32); default: the source's ``torch_dtype``.
    pad_vocab_multiple: embedding rows are padded to a multiple of this (llava-hf uses 64).
    chat_template: a Jinja chat template; default :data:`LLAVA_V1_CHAT_TEMPLATE`.
    max_shard_bytes: output safetensors shard size.
    overwrite: replace an existing ``dst``.

    Memory stays bounded by one source shard plus one output shard. The output folder is
    built under a temporary name and renamed into place, so a failed conversion leaves none.
    """
    check_destination(dst, overwrite)
    source = read_source(src, vision_tower)
    target = plan_target(source, dtype=dtype, pad_vocab_multiple=pad_vocab_multiple)
    return write_hf(source, target, dst, chat_template=chat_template, max_shard_bytes=max_shard_bytes)
