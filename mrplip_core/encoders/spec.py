"""The typed description of an encoder: what to build, how to feed it, how its weights load.

Modelled on timm's ``PretrainedCfg``: one frozen dataclass per registry entry, every field
commented. A spec never imports torch, timm or open_clip, so the registry can be read by
Snakemake when it builds the DAG (for wildcard constraints) without loading a library.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: ImageNet normalisation (timm's IMAGENET_DEFAULT_MEAN / _STD), used by UNI and UNI2-h.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: OpenAI CLIP normalisation, used by QuiltNet (fine-tuned from OpenAI CLIP ViT-B/32) and CONCH.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

Kind = Literal["image", "text"]
Family = Literal["timm", "open_clip", "hf"]
Precision = Literal["bf16", "fp16", "fp32"]
WeightsFormat = Literal["state_dict", "open_clip_dir", "hf_dir"]


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry. Instances are immutable; use :func:`dataclasses.replace` to vary one."""

    # -- identity ------------------------------------------------------------------------
    name: str  # registry key; also the folder name in results/features/{encoder}/
    kind: Kind  # "image": (B, 3, H, W) -> (B, D); "text": list of strings -> (B, D)
    # Library that builds the architecture: timm, open_clip or transformers (hf). "timm" also
    # covers the towers this package assembles from timm's ViT (build.TIMM_BASED_TOWERS: CONCH).
    family: Family
    architecture: str  # timm model name (or a TIMM_BASED_TOWERS name), open_clip built-in config name, or HF model type
    # Keyword arguments for the builder (timm.create_model kwargs for timm). Values that are
    # classes are given as dotted import paths ("timm.layers.SwiGLUPacked") so the spec stays
    # importable without torch and JSON-serialisable into the HDF5 attrs.
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    embed_dim: int = 0  # D, the length of one output feature vector

    # -- input (image encoders) ----------------------------------------------------------
    input_px: int = 224  # side in px of the square image fed to the model
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean of RGB in [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD  # per-channel std of RGB in [0, 1]
    # Resize from the patch's own side (manifest patch_px) to input_px: "area" (cv2.INTER_AREA,
    # anti-aliased when shrinking; cubic when enlarging).
    interpolation: Literal["area"] = "area"

    # -- input (text encoders) -----------------------------------------------------------
    context_length: int | None = None  # max tokens per text; longer texts are truncated
    normalize: bool = False  # output is L2-normalised by the encoder itself (sentence embeddings)

    # -- inference -----------------------------------------------------------------------
    precision: Precision = "bf16"  # autocast dtype on GPU ("auto" precision); CPU runs fp32

    # -- weights -------------------------------------------------------------------------
    # How a local weights path is read:
    #   state_dict    a .safetensors file, or a .bin/.pth/.pt read with torch.load(weights_only=True);
    #   open_clip_dir a folder with open_clip_config.json and one checkpoint (or that checkpoint);
    #   hf_dir        a Hugging Face model folder (config.json, model.safetensors, tokenizer files).
    # Loading is strict: missing, unexpected or mis-shaped keys are an error naming them.
    weights_format: WeightsFormat = "state_dict"
    # The encoder's keys in a checkpoint of a larger model start with this prefix (CONCH's
    # pytorch_model.bin holds the whole CoCa model, the image tower under "visual."): only keys
    # under it are read, the prefix removed. A checkpoint with no key under it is read whole
    # (the encoder saved on its own). "": the checkpoint is the encoder's alone.
    checkpoint_prefix: str = ""
    # Checkpoint keys (after checkpoint_prefix is removed) that the model does not have and
    # does not need: non-persistent buffers that older library versions saved (BERT's
    # embeddings.position_ids), parts of a released tower that the embedding never uses
    # (CONCH's caption pooler); dropped before the check, whether present or not.
    ignore_keys: tuple[str, ...] = ()
    # Weights that ship with an installed package (offline), used when none are configured.
    default_weights: Callable[[], Path] | None = field(default=None, compare=False)
    # The name under which features.weights gives this encoder's weights, when shared with
    # another entry (the QuiltNet text tower reads the QuiltNet folder).
    weights_key: str | None = None
    # There are no real weights for this entry: random init is its purpose, never a fallback.
    random_by_design: bool = False
    seed: int = 0  # torch seed of the random initialisation (random-init runs are reproducible)

    # -- provenance (for people; nothing is ever fetched) --------------------------------
    licence: str = ""  # licence of the real weights
    source: str = ""  # where a user obtains the real weights
    description: str = ""

    def attrs(self) -> dict[str, Any]:
        """Spec fields that describe the encoder in an output file's attrs (JSON-safe values)."""
        return {
            "encoder": self.name,
            "encoder_kind": self.kind,
            "family": self.family,
            "architecture": self.architecture,
            "arch_kwargs": json.dumps(dict(self.arch_kwargs), sort_keys=True),
            "dim": int(self.embed_dim),
            "licence": self.licence,
        }
