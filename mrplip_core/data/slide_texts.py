"""PathFLIP's data: one item per slide, its patch features, its caption and K of its sub-captions.

Built on the artifacts of earlier stages only: ``results/slide_captions.parquet`` (a caption,
or why there is none), ``results/subcaptions/{slide}.parquet`` and
``results/features/{encoder}/{slide}.h5`` (patch features per magnification group).

:func:`build_slide_index` decides, once per run, which slides train: a row per slide with
``status`` ``ok`` (and its ``split``) or the reason it is left out (no caption, no sub-captions,
features missing or failed, no patch at the configured magnifications). The run writes it
next to its checkpoints, so a user sees why a slide was not used.

:class:`SlideTextDataset` reads one slide per item, keyed by ``(epoch, index)`` like the MR-PLIP
bags (:class:`mrplip_core.data.BagStreamSampler` orders them). Every draw is a function of
``(seed, epoch, index)``, so a resumed run reads exactly what the uninterrupted run read:

* patches: at most ``patches_per_slide`` of the slide's patches at the configured
  magnifications, drawn without replacement (memory is bounded whatever the slide's size;
  a smaller slide is padded and masked);
* sub-captions: ``subcaptions_per_slide`` (K) of the slide's sub-captions in a random order
  (all of them, padded and masked, when it has fewer); the first is the slide's negative for
  the other slides of the batch (see :mod:`mrplip_core.losses.pathflip`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mrplip_core.data.dataset import item_seed
from mrplip_core.data.index import slide_split
from mrplip_core.data.slide import read_rows
from mrplip_core.layout import Layout

INDEX_COLUMNS = ["slide_id", "status", "reason", "split", "n_patches", "n_subcaptions", "caption"]


def group_name(magnification: float) -> str:
    """HDF5 group of a magnification in a features file: 20.0 -> "20x"."""
    return f"{magnification:g}x"


def text_key(text: str) -> int:
    """A signed 64-bit key, equal for identical texts (stable across processes and runs)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _features_state(path: Path, magnifications: Sequence[float]) -> tuple[str, str, int, int]:
    """``(status, reason, n_patches at the magnifications, feature width)`` of one features file."""
    if not path.exists():
        return "no_features", f"no features file {path}", 0, 0
    try:
        with h5py.File(path, "r") as f:
            status = str(f.attrs.get("status", "ok"))
            if status != "ok":
                why = f.attrs.get("reason", "") or f.attrs.get("error", "")
                return "features_failed", f"features {status}: {why}".strip(), 0, 0
            groups = [group_name(m) for m in magnifications if group_name(m) in f]
            n = sum(int(f[g]["features"].shape[0]) for g in groups)
            dim = int(f[groups[0]]["features"].shape[1]) if groups else 0
    except OSError as exc:
        return "features_failed", f"cannot read {path}: {exc}", 0, 0
    if n == 0:
        wanted = ", ".join(group_name(m) for m in magnifications)
        return "no_patches", f"no patch at {wanted} in {path.name}", 0, 0
    return "ok", "", n, dim


def build_slide_index(results: str | Path, encoder: str, magnifications: Sequence[float], *,
                      val_fraction: float = 0.0, split_seed: int = 0) -> pd.DataFrame:
    """One row per slide of the slide-captions table: used (``status`` ok, ``split``) or why not.

    Reasons a slide is left out: its caption (``caption_<status>``, e.g. ``caption_missing``),
    ``no_subcaptions`` (file missing or empty), ``no_features``, ``features_failed`` (the
    features stage recorded the slide as failed, or its file cannot be read) and
    ``no_patches`` (none at the configured magnifications).
    """
    layout = Layout(results)
    captions = pd.read_parquet(layout.slide_captions)
    rows = []
    for rec in captions.itertuples(index=False):
        slide = str(rec.slide_id)
        row = {"slide_id": slide, "status": "ok", "reason": "", "split": "", "n_patches": 0, "n_subcaptions": 0,
               "caption": rec.caption if isinstance(rec.caption, str) else ""}
        if rec.status != "ok":
            row.update(status=f"caption_{rec.status}", reason=str(rec.reason))
            rows.append(row)
            continue
        sub_path = layout.subcaptions(slide)
        n_sub = len(pd.read_parquet(sub_path, columns=["text"])) if sub_path.exists() else 0
        row["n_subcaptions"] = n_sub
        if n_sub == 0:
            row.update(status="no_subcaptions", reason=f"no sub-captions in {sub_path}" if sub_path.exists() else f"no file {sub_path}")
            rows.append(row)
            continue
        status, reason, n, _ = _features_state(layout.image_features(encoder, slide), magnifications)
        row.update(status=status, reason=reason, n_patches=n)
        if status == "ok":
            row["split"] = slide_split(slide, val_fraction, split_seed)
        rows.append(row)
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    return index.astype({"n_patches": "int64", "n_subcaptions": "int64"})


@dataclass(frozen=True)
class SlideTextSettings:
    """What one item holds (from ``pathflip.data``)."""

    patches_per_slide: int = 256
    subcaptions_per_slide: int = 8
    max_caption_tokens: int = 256
    max_subcaption_tokens: int = 64


class SlideTextDataset(Dataset):
    """One slide per item: sampled patch features, the caption and K sub-captions, tokenised.

    Parameters
    ----------
    index: rows of :func:`build_slide_index` with status ok (this split).
    results, encoder, magnifications: where the features are and which groups to read.
    tokenizer: the text encoder's tokenizer (Hugging Face).
    settings: patches and sub-captions per item, token lengths.
    seed: seeds every draw, with ``(epoch, index)``.
    """

    def __init__(self, index: pd.DataFrame, results: str | Path, encoder: str, magnifications: Sequence[float],
                 tokenizer: Any, settings: SlideTextSettings, seed: int) -> None:
        self.index = index.reset_index(drop=True)
        self.layout = Layout(results)
        self.encoder = encoder
        self.magnifications = tuple(float(m) for m in magnifications)
        self.tokenizer = tokenizer
        self.settings = settings
        self.seed = seed
        self.pad_token_id = int(tokenizer.pad_token_id)
        self._subcaptions: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def feature_dim(self) -> int:
        _, _, _, dim = _features_state(self.layout.image_features(self.encoder, self.index["slide_id"][0]), self.magnifications)
        return dim

    def subcaptions(self, slide: str) -> list[str]:
        if slide not in self._subcaptions:
            self._subcaptions[slide] = [str(t) for t in pd.read_parquet(self.layout.subcaptions(slide), columns=["text"])["text"]]
        return self._subcaptions[slide]

    def read_patches(self, slide: str, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """Features (N, D) float32, magnification level (N,), level-0 coords (N, 2) and patch ids
        of at most ``patches_per_slide`` patches (all of them, in file order, when ``rng`` is None)."""
        path = self.layout.image_features(self.encoder, slide)
        with h5py.File(path, "r") as f:
            groups = [(lv, f[group_name(m)]) for lv, m in enumerate(self.magnifications) if group_name(m) in f]
            sizes = np.array([g["features"].shape[0] for _, g in groups])
            total = int(sizes.sum())
            if rng is None:
                chosen = np.arange(total)
            else:
                chosen = np.sort(rng.choice(total, size=min(total, self.settings.patches_per_slide), replace=False))
            starts = np.concatenate([[0], np.cumsum(sizes)])
            feats, levels, coords, ids = [], [], [], []
            for gi, (lv, g) in enumerate(groups):
                rows = chosen[(chosen >= starts[gi]) & (chosen < starts[gi + 1])] - starts[gi]
                if not len(rows):
                    continue
                feats.append(read_rows(g["features"], rows).astype(np.float32))
                levels.append(np.full(len(rows), lv, dtype=np.int64))
                coords.append(read_rows(g["coords"], rows).astype(np.int64))
                ids.append(np.asarray(g["patch_ids"].asstr()[()], dtype=object)[rows])
        return {"features": np.concatenate(feats), "level": np.concatenate(levels),
                "coords": np.concatenate(coords), "patch_ids": np.concatenate(ids)}

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        slide = str(self.index["slide_id"][i])
        rng = np.random.default_rng(item_seed(self.seed, epoch, i))
        patches = self.read_patches(slide, rng)
        subs = self.subcaptions(slide)
        order = rng.permutation(len(subs))[: self.settings.subcaptions_per_slide]
        drawn = [subs[j] for j in order]
        return {"features": patches["features"], "level": patches["level"], "caption": str(self.index["caption"][i]),
                "subcaptions": drawn, "keys": [text_key(t) for t in drawn]}


class SlideTextCollator:
    """Pads a list of items into a batch (patches to ``patches_per_slide``, K sub-captions)."""

    def __init__(self, tokenizer: Any, settings: SlideTextSettings) -> None:
        self.tokenizer = tokenizer
        self.settings = settings

    def _tokens(self, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        s = self.settings
        b, p, k = len(items), s.patches_per_slide, s.subcaptions_per_slide
        dim = items[0]["features"].shape[1]
        features = torch.zeros(b, p, dim)
        level = torch.zeros(b, p, dtype=torch.long)
        patch_mask = torch.zeros(b, p, dtype=torch.bool)
        sub_valid = torch.zeros(b, k, dtype=torch.bool)
        sub_keys = torch.zeros(b, k, dtype=torch.long)
        texts: list[str] = []
        for i, item in enumerate(items):
            n = len(item["features"])
            features[i, :n] = torch.from_numpy(item["features"])
            level[i, :n] = torch.from_numpy(item["level"])
            patch_mask[i, :n] = True
            m = len(item["subcaptions"])
            sub_valid[i, :m] = True
            sub_keys[i, :m] = torch.tensor(item["keys"], dtype=torch.long)
            texts += item["subcaptions"] + [""] * (k - m)
        caption_ids, caption_mask = self._tokens([it["caption"] for it in items], s.max_caption_tokens)
        sub_ids, sub_mask = self._tokens(texts, s.max_subcaption_tokens)
        return {"features": features, "level": level, "patch_mask": patch_mask,
                "caption_ids": caption_ids, "caption_mask": caption_mask,
                "sub_ids": sub_ids.view(b, k, -1), "sub_mask": sub_mask.view(b, k, -1),
                "sub_valid": sub_valid, "sub_keys": sub_keys}
