"""Step 1 of the conversion: read an original-format LLaVA-1.5 checkpoint.

:func:`read_source` refuses what ``LlavaForConditionalGeneration`` cannot express (from
``config.json``), lists every weight by its llava-hf name and shape (an unknown name is
refused), finds the vision tower and its config, and loads the tokenizer. No tensor is
loaded beyond what a ``.bin`` file's shapes need; :func:`iter_weights` reads them later,
one file at a time, under their llava-hf names.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrplip_core.convert_llava.errors import ConversionError

SUPPORTED_ARCHITECTURES = ("LlavaLlamaForCausalLM",)

#: Original keys that carry no weights of the target (recomputed buffers).
_DROP_PATTERNS = (
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$"),
)
#: Keys of a CLIP folder that the LLaVA vision tower does not use.
_TOWER_DROP = re.compile(r"^(text_model\.|text_projection|visual_projection|logit_scale|vision_model\.embeddings\.position_ids$|embeddings\.position_ids$)")


@dataclass
class LlavaSource:
    """An original-format checkpoint as :func:`read_source` found it."""

    path: Path
    config: dict[str, Any]  # its config.json
    weight_files: list[Path]  # the checkpoint's weight files, in index order
    tower: Path  # folder of the vision tower (its config.json; its weights unless embedded)
    vision_config: Any  # transformers CLIPVisionConfig of the tower
    tower_files: list[Path]  # the tower folder's weight files; empty when the checkpoint embeds the tower
    shapes: dict[str, tuple[int, ...]]  # llava-hf name -> shape of every weight to write
    tokenizer: Any  # the checkpoint's tokenizer, as released (no <image> token)
    dropped: list[str] = field(default_factory=list)  # source keys without a target (recomputed buffers)
    notes: list[str] = field(default_factory=list)  # what the user should know about the conversion

    @property
    def embedded_tower(self) -> bool:
        """True when the checkpoint carries the vision tower's weights itself."""
        return not self.tower_files


def read_source(src: str | Path, vision_tower: str | Path | None = None) -> LlavaSource:
    """Read the checkpoint folder ``src``; raise :class:`ConversionError` on anything unconvertible.

    ``vision_tower``: local HF CLIP folder of the tower, when ``mm_vision_tower`` names a hub
    id that is neither a local path nor in the local HF cache.
    """
    src = Path(src)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json")
    cfg = json.loads((src / "config.json").read_text())
    notes = check_source(cfg)

    files = weight_files(src)
    if not files:
        raise ConversionError(f"{src} has no weights (*.safetensors or pytorch_model*.bin)")
    shapes: dict[str, tuple[int, ...]] = {}
    dropped: list[str] = []
    for k, s in key_shapes(files).items():  # raises on any unknown key, before anything is written
        t = map_key(k)
        if t is None:
            dropped.append(k)
        else:
            shapes[t] = s
    if not any(k.startswith("multi_modal_projector.") for k in shapes):
        raise ConversionError("no model.mm_projector.* weights in the checkpoint (a projector-only or text-only file?)")

    # vision tower: config from its folder; weights embedded in the checkpoint or from the folder
    embedded = any(k.startswith("vision_tower.") for k in shapes)
    tower = resolve_tower(cfg.get("mm_vision_tower"), src, vision_tower)
    if tower is None:
        raise ConversionError(
            f"vision tower {cfg.get('mm_vision_tower')!r} is not a local folder nor in the local HF cache; "
            "download it (an HF CLIP model folder with config.json) and pass --vision-tower DIR")
    vcfg = vision_config(tower)
    tower_files: list[Path] = []
    if not embedded:
        tower_files = weight_files(tower)
        if not tower_files:
            raise ConversionError(f"vision tower folder {tower} has no weights and the checkpoint embeds none")
        for k, s in key_shapes(tower_files).items():
            t = tower_key(k)
            if t is not None:
                shapes["vision_tower." + t] = s
    if vcfg.hidden_size != cfg.get("mm_hidden_size", vcfg.hidden_size):
        raise ConversionError(f"mm_hidden_size {cfg.get('mm_hidden_size')} != vision tower hidden_size "
                              f"{vcfg.hidden_size} ({tower}): wrong tower for this checkpoint")
    return LlavaSource(path=src, config=cfg, weight_files=files, tower=tower, vision_config=vcfg,
                       tower_files=tower_files, shapes=shapes, tokenizer=_tokenizer(src), dropped=dropped, notes=notes)


def iter_weights(source: LlavaSource) -> Iterator[tuple[str, Any]]:
    """Every weight to write as (llava-hf name, tensor as stored), one source file in memory at a time."""
    for f in source.weight_files:
        for k, v in load_weights(f).items():
            t = map_key(k)
            if t is not None:
                yield t, v
    for f in source.tower_files:
        for k, v in load_weights(f).items():
            t = tower_key(k)
            if t is not None:
                yield "vision_tower." + t, v


def check_source(cfg: dict[str, Any]) -> list[str]:
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


# -- weights ----------------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
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


def load_weights(path: Path) -> dict[str, Any]:
    """All tensors of one weight file (on CPU; ``.bin`` files memory-mapped)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def key_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of all weights (safetensors headers only; .bin files are loaded)."""
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    out[k] = tuple(fh.get_slice(k).get_shape())
        else:
            out.update({k: tuple(v.shape) for k, v in load_weights(f).items()})
    return out


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


# -- the vision tower -------------------------------------------------------------------------
def resolve_tower(name: str | None, src: Path, override: str | Path | None) -> Path | None:
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


def vision_config(tower: Path) -> Any:
    """The tower's CLIPVisionConfig, from a ``clip`` or ``clip_vision_model`` config.json."""
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


def tower_key(k: str) -> str | None:
    """A CLIP folder key as ``vision_model.*`` (classic or transformers-5 flattened), or None to drop."""
    if _TOWER_DROP.match(k):
        return None
    if k.startswith("vision_model."):
        return k
    if k.split(".")[0] in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"):
        return "vision_model." + k
    raise ConversionError(f"vision tower weight {k!r} is not a CLIP vision weight")


def _tokenizer(src: Path) -> Any:
    from transformers import AutoTokenizer

    with warnings.catch_warnings():  # it parses the original config.json too (rope_scaling: null)
        warnings.simplefilter("ignore", FutureWarning)
        return AutoTokenizer.from_pretrained(src)
