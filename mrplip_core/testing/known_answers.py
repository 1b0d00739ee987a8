"""Embedders and data whose right answers are known, for tests and smoke checks.

* :class:`MeanColourEmbedder`: an image is its mean RGB colour (centred on grey); a text is
  the colour its first colour word names, in the same space. On tiles of solid colours
  with colour-name prompts, zero-shot is exact and a linear probe separates the classes;
  with shuffled labels both fall to chance.
* :func:`write_colour_tiles`: such tiles, as a folder of class subfolders plus labels.csv.
* :func:`write_untrained_run`: a pretrain run folder holding an MR-PLIP export with random
  weights (what evaluating an untrained model looks like; exercises the real loader).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from mrplip_core.encoders.catalog import DEFAULT_IMAGE_ENCODER

#: Colour words and their RGB (0-255).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "magenta": (210, 30, 200),
    "cyan": (30, 210, 220),
    "orange": (240, 140, 20),
    "purple": (120, 40, 170),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


def _centred(rgb: Sequence[float]) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float32) / 255.0 - 0.5


class MeanColourEmbedder:
    """Image -> mean RGB - 0.5 (3-d); text -> the RGB - 0.5 of its first colour word (zeros if none)."""

    image_encoder = None

    def __init__(self, name: str = "mean-colour", with_text: bool = True) -> None:
        self.name = name
        self.has_text = with_text
        self._word = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)

    def embed_images(self, images: Sequence[np.ndarray], mpp: float) -> np.ndarray:
        return np.stack([_centred(np.asarray(im, dtype=np.float32)[..., :3].reshape(-1, 3).mean(axis=0)) for im in images])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not self.has_text:
            raise NotImplementedError(f"{self.name} has no text side")
        out = np.zeros((len(texts), 3), dtype=np.float32)
        for i, t in enumerate(texts):
            m = self._word.search(t)
            if m:
                out[i] = _centred(COLOURS[m.group(1).lower()])
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "toy", "name": self.name, "image_encoder": None,
                "text": "colour words" if self.has_text else None,
                "note": "mean RGB colour of the image; texts map colour words to the same RGB space"}


def write_colour_tiles(root: str | Path, colours: Sequence[str] = ("red", "green", "blue", "yellow"),
                       per_class: int = 6, px: int = 64, noise: float = 12.0, seed: int = 0) -> Path:
    """``root/{colour}/{i}.png`` solid-colour tiles with pixel noise, and ``root/labels.csv``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for c in colours:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.asarray(COLOURS[c], dtype=np.float32) + rng.normal(0, noise / 2, 3)
            img = np.clip(base + rng.normal(0, noise, (px, px, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i:03d}.png")
            rows.append({"path": f"{c}/{i:03d}.png", "label": c})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def colour_prompts(colours: Sequence[str]) -> dict[str, Any]:
    """A prompt-set dict naming each class by its colour."""
    return {"templates": ["a {name} tile.", "an image that is {name}."], "classes": {c: [c, f"{c} colour"] for c in colours}}


def write_untrained_run(run_dir: str | Path, *, image_encoder: str = DEFAULT_IMAGE_ENCODER, image_dim: int | None = None,
                        magnifications: Sequence[float] = (5.0, 10.0, 20.0, 40.0), keyword_dim: int = 384,
                        seed: int = 0, val_slides: Sequence[str] = (), train_slides: Sequence[str] = (),
                        loss_weights: dict[str, float] | None = None, steps: int = 1) -> Path:
    """A run folder with an MR-PLIP export of random weights (``mrplip_core.model.load`` reads it).

    The text encoder is a 2-layer random BERT with the bundled MiniLM tokenizer; the heads
    are the ITC ones. ``config.yaml`` records the run as the trainer does (image encoder,
    magnifications, loss weights), ``bag_index.parquet`` the slide split.
    """
    import torch

    from mrplip_core.encoders import get_spec
    from mrplip_core.model import ModelDims, ModelSettings, MRPLIPModel, build_text_encoder, load_tokenizer, save_export
    from mrplip_core.model.export import TOKENIZER
    from mrplip_core.train.summary import RUN_CONFIG_FILE

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text_config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    settings = ModelSettings(text_encoder="random", text_config=text_config, embed_dim=32)
    tokenizer = load_tokenizer("random")
    dims = ModelDims(int(image_dim or get_spec(image_encoder).embed_dim), keyword_dim, tuple(float(m) for m in magnifications),
                     int(len(tokenizer)))
    torch.manual_seed(seed)
    text = build_text_encoder("random", text_config, vocab_size=dims.vocab_size)
    model = MRPLIPModel(settings, dims, text, heads=("itc",))
    tokenizer.save_pretrained(str(run_dir / TOKENIZER))
    weights = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "plm": 1.0, "cvta": 1.0, "mrtva": 1.0, **(loss_weights or {})}
    config = {"pretrain": {"run": run_dir.name, "seed": seed,
                           "data": {"image_encoder": image_encoder, "magnifications": [float(m) for m in magnifications]},
                           "model": {"text_encoder": "random", "text_config": text_config, "embed_dim": 32},
                           "loss": {"weights": weights}, "train": {"steps": steps}}}
    (run_dir / RUN_CONFIG_FILE).write_text("# untrained run written by mrplip_core.testing.known_answers\n" + yaml.safe_dump(config))
    index = [(s, f"{s}_bag", "val") for s in val_slides] + [(s, f"{s}_bag", "train") for s in train_slides]
    pd.DataFrame(index, columns=["slide_id", "bag_id", "split"]).to_parquet(run_dir / "bag_index.parquet", index=False)
    save_export(run_dir, model, itc_temperature=0.07, extra={"run": run_dir.name, "steps": steps, "max_caption_tokens": 64})
    return run_dir
