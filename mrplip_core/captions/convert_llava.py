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
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

SUPPORTED_ARCHITECTURES = ("LlavaLlamaForCausalLM",)
IMAGE_TOKEN = "<image>"

#: Original keys that carry no weights of the target (recomputed buffers).
_DROP_PATTERNS = (
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$"),
)
#: Keys of a CLIP folder that the LLaVA vision tower does not use.
_TOWER_DROP = re.compile(r"^(text_model\.|text_projection|visual_projection|logit_scale|vision_model\.embeddings\.position_ids$|embeddings\.position_ids$)")


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says what and why."""


@dataclass
class ConversionReport:
    """What :func:`convert_llava` did (also written as ``mrplip_conversion.json``)."""

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


# -- reading weights --------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in index order (safetensors preferred)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.exists():
            names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            return [folder / n for n in names]
        if (folder / single).exists():
            return [folder / single]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    return files


def _load(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _key_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of all weights (safetensors headers only; .bin files are loaded)."""
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    out[k] = tuple(fh.get_slice(k).get_shape())
        else:
            out.update({k: tuple(v.shape) for k, v in _load(f).items()})
    return out


# -- the vision tower -------------------------------------------------------------------------
def _resolve_tower(name: str | None, src: Path, override: str | Path | None) -> Path | None:
    """Local folder of the vision tower: the override, a path, or a local HF cache entry."""
    if override:
        p = Path(override)
        if not (p / "config.json").exists():
            raise ConversionError(f"--vision-tower {p} has no config.json (an HF CLIP model folder is needed)")
        return p
    if not name:
        return None
    for cand in (Path(name), src / name):
        if (cand / "config.json").exists():
            return cand
    try:  # an HF cache that already holds it (never downloads)
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(name, local_files_only=True))
        if (p / "config.json").exists():
            return p
    except Exception:  # noqa: BLE001 - not cached / not a repo id
        pass
    return None


def _vision_config(tower: Path):
    from transformers import CLIPVisionConfig

    cfg = json.loads((tower / "config.json").read_text())
    mt = cfg.get("model_type")
    if mt == "clip":
        vc = cfg.get("vision_config") or {}
        return CLIPVisionConfig(**{k: v for k, v in vc.items() if k not in ("model_type", "transformers_version")})
    if mt == "clip_vision_model":
        return CLIPVisionConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")})
    raise ConversionError(f"vision tower {tower} is model_type {mt!r}; only CLIP towers (clip, clip_vision_model) "
                          "convert to LlavaForConditionalGeneration")


def _tower_key(k: str) -> str | None:
    """A CLIP folder key as ``vision_model.*`` (classic or transformers-5 flattened), or None to drop."""
    if _TOWER_DROP.match(k):
        return None
    if k.startswith("vision_model."):
        return k
    if k.split(".")[0] in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"):
        return "vision_model." + k
    raise ConversionError(f"vision tower weight {k!r} is not a CLIP vision weight")


# -- mapping ----------------------------------------------------------------------------------
def map_key(k: str) -> str | None:
    """Target (llava-hf) name of an original LLaVA weight; None for dropped buffers.

    Raises ConversionError for a key the mapping does not know.
    """
    if any(p.match(k) for p in _DROP_PATTERNS):
        return None
    if k == "lm_head.weight":
        return "language_model.lm_head.weight"
    m = re.match(r"^model\.mm_projector\.(\d+)\.(weight|bias)$", k)
    if m:
        idx = {"0": "linear_1", "2": "linear_2"}.get(m[1])
        if idx is None:
            raise ConversionError(f"projector weight {k!r}: only the two Linear layers of mlp2x_gelu (0, 2) map")
        return f"multi_modal_projector.{idx}.{m[2]}"
    if k.startswith("model.vision_tower.vision_tower."):
        return "vision_tower." + k[len("model.vision_tower.vision_tower."):]
    if re.match(r"^model\.(embed_tokens|layers\.\d+|norm)\.", k):
        return "language_model." + k
    raise ConversionError(f"weight {k!r} has no counterpart in LlavaForConditionalGeneration")


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
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


_LLAVA_ONLY_KEYS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
    "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
    "use_mm_proj", "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "unfreeze_mm_vision_tower",
    "mm_projector_lr", "mm_vision_tower_lr", "use_cache", "auto_map",
}


def _check_source(cfg: dict[str, Any]) -> list[str]:
    """Refuse what LlavaForConditionalGeneration cannot express; returns notes."""
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch == "LlavaForConditionalGeneration":
        raise ConversionError("this checkpoint is already in HF LlavaForConditionalGeneration format: serve it as it is")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"architecture {arch!r} is not supported: only {SUPPORTED_ARCHITECTURES} "
                              "(LLaVA-1.5 on a LLaMA/Vicuna language model, as Quilt-LLaVA)")
    if "mm_vision_tower" not in cfg and "mm_hidden_size" not in cfg:
        raise ConversionError("config.json has no mm_vision_tower / mm_hidden_size: not a LLaVA checkpoint")
    ptype = cfg.get("mm_projector_type", "linear")  # LLaVA's own default
    if ptype != "mlp2x_gelu":
        raise ConversionError(f"mm_projector_type {ptype!r} cannot be converted: LlavaForConditionalGeneration has "
                              "exactly a Linear-GELU-Linear projector (mlp2x_gelu)")
    if cfg.get("mm_use_im_start_end"):
        raise ConversionError("mm_use_im_start_end=true (image start/end tokens) is not supported by "
                              "LlavaForConditionalGeneration")
    aspect = cfg.get("image_aspect_ratio") or "square"
    if str(aspect).startswith("anyres") or str(cfg.get("mm_patch_merge_type", "flat")).startswith("spatial"):
        raise ConversionError(f"image_aspect_ratio {aspect!r} / mm_patch_merge_type "
                              f"{cfg.get('mm_patch_merge_type')!r} is LLaVA-NeXT tiling (use a LlavaNext converter)")
    if cfg.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature {cfg['mm_vision_select_feature']!r} is not patch or cls_patch")
    notes = []
    if aspect == "pad":
        notes.append("image_aspect_ratio 'pad' (pad to square) is done by the processor's resize + centre crop "
                     "only for square images; MR-PLIP patches are square, so this is exact for them")
    if cfg.get("mm_use_im_patch_token"):
        notes.append("mm_use_im_patch_token: the <im_patch> token stays in the vocabulary, unused")
    return notes


def _text_config(cfg: dict[str, Any], vocab_size: int):
    from transformers import LlamaConfig

    keep = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in _LLAVA_ONLY_KEYS}
    keep["vocab_size"] = vocab_size
    if keep.get("rope_scaling") is None:
        keep.pop("rope_scaling", None)  # LLaMA-2 releases write null
    return LlamaConfig(**keep)


def _iter_mapped(files: list[Path]) -> Iterator[tuple[str, Any]]:
    for f in files:
        for k, v in _load(f).items():
            t = map_key(k)
            if t is not None:
                yield t, v


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
    import torch
    from safetensors.torch import save_file
    from transformers import AddedToken, AutoTokenizer, GenerationConfig, LlavaConfig, LlavaProcessor

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty (use --overwrite)")
    cfg = json.loads((src / "config.json").read_text())
    notes = _check_source(cfg)

    files = _weight_files(src)
    if not files:
        raise ConversionError(f"{src} has no weights (*.safetensors or pytorch_model*.bin)")
    shapes = _key_shapes(files)
    mapped_shapes: dict[str, tuple[int, ...]] = {}
    dropped: list[str] = []
    for k, s in shapes.items():  # raises on any unknown key, before anything is written
        t = map_key(k)
        if t is None:
            dropped.append(k)
        else:
            mapped_shapes[t] = s
    if not any(k.startswith("multi_modal_projector.") for k in mapped_shapes):
        raise ConversionError("no model.mm_projector.* weights in the checkpoint (a projector-only or text-only file?)")

    # vision tower: config from its folder; weights embedded in the checkpoint or from the folder
    embedded = any(k.startswith("vision_tower.") for k in mapped_shapes)
    tower = _resolve_tower(cfg.get("mm_vision_tower"), src, vision_tower)
    if tower is None:
        raise ConversionError(
            f"vision tower {cfg.get('mm_vision_tower')!r} is not a local folder nor in the local HF cache; "
            "download it (an HF CLIP model folder with config.json) and pass --vision-tower DIR")
    vcfg = _vision_config(tower)
    tower_files: list[Path] = []
    if not embedded:
        tower_files = _weight_files(tower)
        if not tower_files:
            raise ConversionError(f"vision tower folder {tower} has no weights and the checkpoint embeds none")
        for k, s in _key_shapes(tower_files).items():
            t = _tower_key(k)
            if t is not None:
                mapped_shapes["vision_tower." + t] = s
    if vcfg.hidden_size != cfg.get("mm_hidden_size", vcfg.hidden_size):
        raise ConversionError(f"mm_hidden_size {cfg.get('mm_hidden_size')} != vision tower hidden_size "
                              f"{vcfg.hidden_size} ({tower}): wrong tower for this checkpoint")

    # tokenizer with the <image> token; vocabulary padded
    with warnings.catch_warnings():  # it parses the original config.json too (rope_scaling: null)
        warnings.simplefilter("ignore", FutureWarning)
        tok = AutoTokenizer.from_pretrained(src)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    old_vocab = mapped_shapes["language_model.model.embed_tokens.weight"][0]
    vocab = max(old_vocab, len(tok))
    if pad_vocab_multiple > 1:
        vocab = -(-vocab // pad_vocab_multiple) * pad_vocab_multiple
    for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if k in mapped_shapes:
            mapped_shapes[k] = (vocab, *mapped_shapes[k][1:])

    n_img = (vcfg.image_size // vcfg.patch_size) ** 2
    select = cfg.get("mm_vision_select_feature", "patch")
    text_cfg = _text_config(cfg, vocab)
    out_dtype = dtype or cfg.get("torch_dtype") or "float16"
    config = LlavaConfig(
        vision_config=vcfg.to_dict(), text_config=text_cfg.to_dict(), image_token_index=image_id,
        image_seq_length=n_img if select == "patch" else n_img + 1,
        vision_feature_select_strategy="default" if select == "patch" else "full",
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)), projector_hidden_act="gelu",
        multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = out_dtype

    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(mapped_shapes))
    extra = sorted(set(mapped_shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(mapped_shapes) if tuple(expected[k]) != tuple(mapped_shapes[k]))
    if missing or extra or wrong:
        raise ConversionError(
            "the weights do not match the target model: "
            + "; ".join(f"{name}: {v[:5]}{' ...' if len(v) > 5 else ''}"
                        for name, v in (("missing", missing), ("unexpected", extra),
                                        ("shape mismatch", [f"{k} {mapped_shapes[k]} != {expected[k]}" for k in wrong]))
                        if v))

    torch_dtype = getattr(torch, out_dtype)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        # weights, streamed shard by shard
        def stream() -> Iterator[tuple[str, Any]]:
            yield from _iter_mapped(files)
            for f in tower_files:
                for k, v in _load(f).items():
                    t = _tower_key(k)
                    if t is not None:
                        yield "vision_tower." + t, v

        shards: list[dict[str, Any]] = [{}]
        size = 0
        weight_map: dict[str, str] = {}
        names: list[str] = []

        def flush() -> None:
            nonlocal size
            if shards[-1]:
                name = f"model-{len(names) + 1:05d}.safetensors"
                save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shards[-1]})
                names.append(name)
                shards[-1] = {}
                size = 0

        for k, v in stream():
            v = v.to(torch_dtype)
            if k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight") and v.shape[0] < vocab:
                mean = v.float().mean(dim=0, keepdim=True).to(torch_dtype)
                v = torch.cat([v, mean.expand(vocab - v.shape[0], -1)], dim=0)
            shards[-1][k] = v.contiguous()
            size += v.numel() * v.element_size()
            if size >= max_shard_bytes:
                flush()
        flush()
        if len(names) == 1:
            (tmp / names[0]).rename(tmp / "model.safetensors")
        else:
            total = 0
            final = {}
            for i, n in enumerate(names, 1):
                new = f"model-{i:05d}-of-{len(names):05d}.safetensors"
                (tmp / n).rename(tmp / new)
                final[n] = new
            weight_map = {k: final[n] for k, n in weight_map.items()}
            total = sum((tmp / n).stat().st_size for n in final.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))

        config.save_pretrained(tmp)
        gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        if (src / "generation_config.json").exists():
            src_gen = json.loads((src / "generation_config.json").read_text())
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if src_gen.get(k) is not None:
                    setattr(gen, k, src_gen[k])
        gen.save_pretrained(tmp)

        image_processor, how = _image_processor(tower, vcfg)
        notes.append(how)
        template = chat_template or LLAVA_V1_CHAT_TEMPLATE
        tok.chat_template = template
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vcfg.patch_size,
                                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                                   num_additional_image_tokens=1, chat_template=template, image_token=IMAGE_TOKEN)
        processor.save_pretrained(tmp)
        tok.save_pretrained(tmp)

        report = ConversionReport(
            source=str(src.resolve()), target=str(dst.resolve()), vision_tower=str(tower),
            vision_weights="checkpoint" if embedded else str(tower), image_size=vcfg.image_size,
            patch_size=vcfg.patch_size, image_tokens=config.image_seq_length, vocab_size=vocab,
            image_token_index=image_id, mapped=len(weight_map) if weight_map else len(expected),
            dropped=dropped, notes=notes,
        )
        (tmp / "mrplip_conversion.json").write_text(json.dumps(report.to_dict(), indent=1))
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _image_processor(tower: Path, vcfg):
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
