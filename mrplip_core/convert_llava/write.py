"""Step 3 of the conversion: write the llava-hf folder.

:func:`write_hf` streams the converted weights into safetensors shards (memory bounded by
one source file plus one output shard), then writes the config, the generation config, the
processor (image processor, tokenizer, chat template) and ``mrplip_conversion.json``. All of
it goes into a temporary folder beside the destination that is renamed into place, so a
failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrplip_core.convert_llava.convert import IMAGE_TOKEN, LlavaTarget, convert_tensor
from mrplip_core.convert_llava.errors import ConversionError
from mrplip_core.convert_llava.read import LlavaSource, iter_weights

#: LLaVA-1.5 "vicuna_v1" conversation format (system, USER/ASSISTANT, sep " ", sep2 "</s>").
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")

LLAVA_V1_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{{ messages[0]['content'] }}"
    "{% else %}{% for c in messages[0]['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% else %}" + VICUNA_SYSTEM + "{% endif %} "
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for c in message['content'] %}{% if c['type'] in ['image', 'image_url'] %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

REPORT_JSON = "mrplip_conversion.json"


@dataclass
class ConversionReport:
    """What the conversion did (also written as ``mrplip_conversion.json``)."""

    source: str
    target: str
    vision_tower: str  # where the tower config came from
    vision_weights: str  # "checkpoint" (embedded) or the tower folder
    image_size: int
    patch_size: int
    image_tokens: int
    vocab_size: int  # after adding <image> and padding
    image_token_index: int
    mapped: int  # weights written
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_destination(dst: str | Path, overwrite: bool) -> None:
    """Refuse a non-empty ``dst`` unless ``overwrite`` (checked before any work is done)."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty (use --overwrite)")


def write_hf(source: LlavaSource, target: LlavaTarget, dst: str | Path, *, chat_template: str | None = None,
             max_shard_bytes: int = 5 * 1024**3) -> ConversionReport:
    """Write ``target`` with ``source``'s weights into the HF folder ``dst`` (replaced if it exists).

    ``chat_template``: a Jinja chat template, default :data:`LLAVA_V1_CHAT_TEMPLATE`;
    ``max_shard_bytes``: output safetensors shard size.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        weight_map = _write_weights(source, target, tmp, max_shard_bytes)
        target.config.save_pretrained(tmp)
        _generation_config(source, target).save_pretrained(tmp)
        processor_note = _write_processor(source, target, tmp, chat_template or LLAVA_V1_CHAT_TEMPLATE)
        vcfg = source.vision_config
        report = ConversionReport(
            source=str(source.path.resolve()), target=str(dst.resolve()), vision_tower=str(source.tower),
            vision_weights="checkpoint" if source.embedded_tower else str(source.tower), image_size=vcfg.image_size,
            patch_size=vcfg.patch_size, image_tokens=target.config.image_seq_length, vocab_size=target.vocab_size,
            image_token_index=target.image_token_index, mapped=len(weight_map) or len(target.expected),
            dropped=list(source.dropped), notes=[*source.notes, processor_note],
        )
        (tmp / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=1))
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_weights(source: LlavaSource, target: LlavaTarget, folder: Path, max_shard_bytes: int) -> dict[str, str]:
    """Stream the converted weights into ``model.safetensors``, or numbered shards plus an
    index when they exceed ``max_shard_bytes``; returns weight name -> file name."""
    from safetensors.torch import save_file

    files: list[str] = []
    weight_map: dict[str, str] = {}
    shard: dict[str, Any] = {}
    size = 0

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)

    for name, value in iter_weights(source):
        tensor = convert_tensor(name, value, target)
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= max_shard_bytes:
            flush()
            shard, size = {}, 0
    if shard:
        flush()

    if len(files) == 1:
        (folder / files[0]).rename(folder / "model.safetensors")
        return dict.fromkeys(weight_map, "model.safetensors")
    final = {n: f"model-{i:05d}-of-{len(files):05d}.safetensors" for i, n in enumerate(files, 1)}
    for old, new in final.items():
        (folder / old).rename(folder / new)
    weight_map = {k: final[n] for k, n in weight_map.items()}
    total = sum((folder / n).stat().st_size for n in final.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return weight_map


def _generation_config(source: LlavaSource, target: LlavaTarget) -> Any:
    """BOS/EOS/pad ids of the tokenizer, overridden by the source's generation_config.json."""
    from transformers import GenerationConfig

    tok = target.tokenizer
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    path = source.path / "generation_config.json"
    if path.exists():
        src_gen = json.loads(path.read_text())
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if src_gen.get(k) is not None:
                setattr(gen, k, src_gen[k])
    return gen


def _write_processor(source: LlavaSource, target: LlavaTarget, folder: Path, chat_template: str) -> str:
    """Processor and tokenizer (with ``chat_template``) into ``folder``; returns a note on the image processor."""
    from transformers import LlavaProcessor

    image_processor, note = _image_processor(source.tower, source.vision_config)
    tok = target.tokenizer
    tok.chat_template = chat_template
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=source.vision_config.patch_size,
                               vision_feature_select_strategy=target.config.vision_feature_select_strategy,
                               num_additional_image_tokens=1, chat_template=chat_template, image_token=IMAGE_TOKEN)
    processor.save_pretrained(folder)
    tok.save_pretrained(folder)
    return note


def _image_processor(tower: Path, vcfg: Any) -> tuple[Any, str]:
    """The tower's own preprocessor config if it has one, else CLIP defaults at its image size."""
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    if (tower / "preprocessor_config.json").exists():
        return ImageProcessor.from_pretrained(tower), f"image processor: {tower / 'preprocessor_config.json'}"
    size = vcfg.image_size
    ip = ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return ip, (f"image processor: the tower has no preprocessor_config.json; CLIP defaults at {size} px "
                "(OpenAI CLIP mean/std) were used: check they match how the tower was trained")
