"""Build an encoder's architecture and put weights in it: from a local path, or seeded random.

With weights, the model is built on the meta device (no time spent on an initialisation
that is about to be overwritten), the checkpoint (the encoder's keys under
``spec.checkpoint_prefix`` when it holds a whole model) is checked strictly against it, and
the tensors are assigned. Models with non-persistent buffers (which a checkpoint does not
carry, e.g. CLIP's attention mask) are built normally instead. Without weights the model
is built under a fixed torch seed and fingerprinted from its state dict.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mrplip_core.encoders.spec import EncoderSpec
from mrplip_core.encoders.weights import (
    RANDOM_INIT,
    WeightsError,
    WeightsInfo,
    check_state_dict,
    checkpoint_dtype,
    keys_under,
    weights_sha256,
    read_state_dict,
    state_dict_sha256,
)

# No code path downloads weights: make the Hugging Face libraries refuse to, too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: arch_kwargs whose values are dotted import paths of classes.
_CLASS_KWARGS = ("mlp_layer", "act_layer", "norm_layer", "block_fn", "embed_layer")

#: Image towers this package assembles from timm's ViT (family "timm"): architecture name ->
#: dotted path of the ``nn.Module`` class, called with the spec's arch_kwargs. Every other
#: timm-family architecture is a timm model name.
TIMM_BASED_TOWERS = {"conch_ViT-B-16": "mrplip_core.encoders.conch.ConchImageTower"}

#: Checkpoint file names of an open_clip weights folder (beside open_clip_config.json), best first.
OPEN_CLIP_CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
#: Generic checkpoint file names (a Hugging Face transformers folder), best first.
CHECKPOINT_NAMES = ("model.safetensors", "pytorch_model.bin")


def resolve_weights(spec: EncoderSpec, weights: str | os.PathLike[str] | None, allow_random_init: bool) -> Path | None:
    """The local path to load for ``spec``, or None for a random init.

    Order: the configured path, then weights bundled with an installed package. Without
    either, an entry that is random by design builds randomly; a real encoder does so only
    when ``allow_random_init`` (and says so in every output), else it is an error.
    """
    if weights:
        path = Path(weights).expanduser()
        if not path.exists():
            raise WeightsError(f"encoder {spec.name!r}: weights path not found: {path}")
        return path
    if spec.default_weights is not None:
        return spec.default_weights()
    if spec.random_by_design or allow_random_init:
        return None
    raise WeightsError(
        f"encoder {spec.name!r} has no weights: set features.weights.{spec.weights_key or spec.name} to a local "
        f"path ({spec.source}), or set features.allow_random_init to true to run it with random weights"
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Make ``torch.nn.init`` functions no-ops while a model whose weights will be loaded is built.

    Parameters are left uninitialised (every one is then overwritten by a strict load);
    buffers computed in constructors (attention masks, position ids) are unaffected.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _import_object(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def timm_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    """``spec.arch_kwargs`` with class paths imported, ready for ``timm.create_model``."""
    kwargs = dict(spec.arch_kwargs)
    for key in _CLASS_KWARGS:
        if isinstance(kwargs.get(key), str):
            kwargs[key] = _import_object(kwargs[key])
    return kwargs


def timm_factory(spec: EncoderSpec) -> Callable[[], nn.Module]:
    """A no-argument builder of the spec's timm architecture (never ``pretrained=True``), or of
    its tower in :data:`TIMM_BASED_TOWERS`."""
    kwargs = timm_kwargs(spec)
    if spec.architecture in TIMM_BASED_TOWERS:
        tower = _import_object(TIMM_BASED_TOWERS[spec.architecture])
        return lambda: tower(**kwargs)
    import timm

    return lambda: timm.create_model(spec.architecture, pretrained=False, **kwargs)


def instantiate(
    factory: Callable[[], nn.Module],
    spec: EncoderSpec,
    checkpoint: Path | None,
) -> tuple[nn.Module, WeightsInfo]:
    """Build with ``factory`` and fill the weights (see the module docstring); eval mode, fp32."""
    if checkpoint is None:
        with seeded(spec.seed):
            model = factory()
        info = WeightsInfo(RANDOM_INIT, state_dict_sha256(model.state_dict()), "float32", seed=spec.seed)
        return model.eval(), info
    what = f"encoder {spec.name!r} from {checkpoint}"
    state = read_state_dict(checkpoint)
    inner = keys_under(state, spec.checkpoint_prefix) if spec.checkpoint_prefix else {}
    if inner:  # the encoder inside a whole model's checkpoint (else: saved on its own)
        state, what = inner, f"{what} (its keys under {spec.checkpoint_prefix!r}, prefix removed)"
    with torch.device("meta"):
        skeleton = factory()
    state = check_state_dict(skeleton, state, what=what, ignore=spec.ignore_keys)
    info = WeightsInfo(str(checkpoint), weights_sha256(checkpoint), checkpoint_dtype(state))
    persistent = set(skeleton.state_dict())
    if all(name in persistent for name, _ in skeleton.named_buffers()):
        model = skeleton.to_empty(device="cpu")
        model.load_state_dict(state, strict=True, assign=True)
    else:  # buffers the checkpoint lacks must be computed: build on CPU, skipping the init
        with skip_init():
            model = factory()
        model.load_state_dict(state, strict=True)
    del state
    return model.float().eval(), info


def find_checkpoint(folder: Path, what: str, open_clip: bool | None = None) -> Path:
    """The one checkpoint file in ``folder``: a known name, else the only weights file.

    In an open_clip folder (``open_clip``; None: the folder holds an open_clip_config.json)
    open_clip's names come first and the generic ones only when none of those exists: a
    Hugging Face download of an open_clip model (QuiltNet) may also hold the transformers
    format ``model.safetensors``, whose keys do not fit open_clip's CLIP. Elsewhere the
    generic names come first.
    """
    if open_clip is None:
        open_clip = (folder / "open_clip_config.json").is_file()
    if open_clip:
        names = OPEN_CLIP_CHECKPOINT_NAMES + CHECKPOINT_NAMES
    else:
        names = CHECKPOINT_NAMES + OPEN_CLIP_CHECKPOINT_NAMES
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".pth", ".pt"})
    if len(found) == 1:
        return found[0]
    raise WeightsError(
        f"{what}: expected one checkpoint in {folder} (one of {', '.join(names)}), "
        f"found {[p.name for p in found] or 'none'}"
    )


def open_clip_config(spec: EncoderSpec, weights: Path | None) -> tuple[dict[str, Any], dict[str, Any], Path | None]:
    """``(model_cfg, preprocess_cfg, checkpoint)`` for an open_clip encoder.

    With weights: ``weights`` is the folder holding ``open_clip_config.json`` and one
    checkpoint, or the checkpoint file with that config beside it. Without: open_clip's
    built-in config for ``spec.architecture`` (random init). ``quick_gelu`` defaults to the
    spec's when the config does not say.
    """
    import open_clip

    what = f"encoder {spec.name!r}"
    if weights is None:
        model_cfg = open_clip.get_model_config(spec.architecture)
        if model_cfg is None:
            raise WeightsError(f"{what}: open_clip has no built-in config {spec.architecture!r}")
        preprocess: dict[str, Any] = {}
        checkpoint = None
    else:
        folder = weights if weights.is_dir() else weights.parent
        config_path = folder / "open_clip_config.json"
        if not config_path.is_file():
            raise WeightsError(f"{what}: no open_clip_config.json in {folder}")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{what}: {config_path} is not valid JSON: {exc}") from exc
        if "model_cfg" not in config:
            raise WeightsError(f"{what}: {config_path} has no 'model_cfg'")
        model_cfg, preprocess = dict(config["model_cfg"]), dict(config.get("preprocess_cfg", {}))
        checkpoint = weights if weights.is_file() else find_checkpoint(folder, what, open_clip=True)
    model_cfg = dict(model_cfg)
    model_cfg.setdefault("quick_gelu", bool(spec.arch_kwargs.get("quick_gelu", False)))
    unsupported = {"custom_text", "multimodal_cfg"} & set(model_cfg)
    text_cfg = model_cfg.get("text_cfg", {})
    if unsupported or "hf_model_name" in text_cfg or "timm_model_name" in model_cfg.get("vision_cfg", {}):
        raise WeightsError(
            f"{what}: only plain open_clip CLIP configs (ViT image tower, CLIP text tower) are "
            f"supported; {config_path if weights else spec.architecture} uses other towers"
        )
    return model_cfg, preprocess, checkpoint


def open_clip_factory(model_cfg: dict[str, Any]) -> Callable[[], nn.Module]:
    """A no-argument builder of ``open_clip.CLIP(**model_cfg)``."""
    from open_clip.model import CLIP

    return lambda: CLIP(**model_cfg)
