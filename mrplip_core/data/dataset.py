"""The bag dataset: one item = one visual bag, drawn to a fixed number of patches.

An item is addressed by ``(epoch, index)``: everything random about it (which patches,
which keywords, which caption tokens are masked for MLM, where each PLM prefix ends) is
drawn from a generator seeded with ``(seed, epoch, index)``. A sample is therefore the
same whichever rank, worker or process count draws it, which makes resumed and
multi-process runs see exactly the data an uninterrupted single run sees.

Item fields (P patches per bag, L caption tokens, K keywords):

==================  ================  =====================================================
features            (P, D) float16    frozen image-encoder features of the drawn patches
level               (P,) long         index into the configured magnifications
magnification       (P,) float32      x
parent              (P,) long         slot of the nearest drawn ancestor, -1 for none
input_ids           (P, L) long       tokenized captions, right-padded
attention_mask      (P, L) long
mlm_input_ids       (P, L) long       captions corrupted for MLM
mlm_labels          (P, L) long       original ids at the masked positions, -100 elsewhere
plm_labels          (P, L) long       suffix ids for PLM, -100 on prefix and padding
plm_prefix          (P,) long         prefix length per caption
keyword_features    (K, Dt) float16   keyword features of the textual bag (zero padding)
keyword_mask        (K,) bool         True on real keywords
bag                 () long           row of the bag in the index
==================  ================  =====================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mrplip_core.data.sampling import sample_bag
from mrplip_core.data.lm_inputs import IGNORE_INDEX, make_prefix_lm_batch, mask_tokens
from mrplip_core.data.settings import DataSettings
from mrplip_core.data.slide import SlideStore


@dataclass(frozen=True)
class TokenizerInfo:
    """What the dataset needs of the tokenizer besides the tokenizer itself."""

    pad_token_id: int
    mask_token_id: int
    vocab_size: int
    special_token_ids: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer: Any) -> TokenizerInfo:
        return cls(
            pad_token_id=int(tokenizer.pad_token_id),
            mask_token_id=int(tokenizer.mask_token_id),
            vocab_size=int(len(tokenizer)),
            special_token_ids=tuple(sorted(int(i) for i in tokenizer.all_special_ids)),
        )


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class BagDataset(Dataset):
    """Map-style dataset over the bags of an index; items are keyed by ``(epoch, index)``.

    Parameters
    ----------
    index: rows (slide_id, bag_id) of the bags to serve, e.g. the train split.
    settings: the ``pretrain.data`` section.
    tokenizer: a Hugging Face tokenizer (fast or slow) for the captions.
    seed: base seed of the per-item draws.
    store: the slide store to read through (default: a new one on ``settings``).
    mlm: keyword arguments of :func:`mrplip_core.data.lm_inputs.mask_tokens` (the ``loss.mlm``
        section: mask_prob, mask_token_frac, random_token_frac).
    plm: keyword arguments of :func:`mrplip_core.data.lm_inputs.make_prefix_lm_batch` (the
        ``loss.plm`` section: min_prefix).
    """

    def __init__(
        self,
        index: pd.DataFrame,
        settings: DataSettings,
        tokenizer: Any,
        seed: int = 0,
        store: SlideStore | None = None,
        mlm: Mapping[str, Any] | None = None,
        plm: Mapping[str, Any] | None = None,
    ) -> None:
        self.slide_ids = index["slide_id"].astype(str).to_numpy()
        self.bag_ids = index["bag_id"].astype(str).to_numpy()
        self.settings = settings
        self.tokenizer = tokenizer
        self.token_info = TokenizerInfo.of(tokenizer)
        self.seed = int(seed)
        self.mlm_kwargs = dict(mlm or {})
        self.plm_kwargs = dict(plm or {})
        self.store = store or SlideStore(settings.paths(), settings.magnifications, settings.slide_cache)

    def __len__(self) -> int:
        return len(self.bag_ids)

    def slide_numbers(self) -> np.ndarray:
        """(n_bags,) int: the number of each bag's slide (for the sampler's shuffle window)."""
        return np.unique(self.slide_ids, return_inverse=True)[1].astype(np.int64)

    def feature_dims(self) -> tuple[int, int]:
        """(image feature dim D, keyword feature dim Dt), read from the first bag's slide."""
        if not len(self):
            raise ValueError("the dataset has no bags")
        slide = str(self.slide_ids[0])
        return self.store.image_dim(slide), self.store.keyword_dim(slide)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, int(key))
        s = self.settings
        seed = item_seed(self.seed, epoch, index)
        rng = np.random.default_rng(seed)
        generator = torch.Generator().manual_seed(seed)

        slide = self.store.slide(str(self.slide_ids[index]))
        bag_id = str(self.bag_ids[index])
        members = slide.bags.get(bag_id)
        if members is None:
            raise KeyError(f"bag {bag_id!r} not found in slide {slide.slide_id!r}")
        local, parent = sample_bag(slide.level[members], _local_ancestors(slide.ancestor, members), s.patches_per_magnification, rng)
        positions = members[local]
        features = self.store.image_features(slide, positions)

        captions = [str(c) for c in slide.captions[positions]]
        encoded = self.tokenizer(captions, truncation=True, max_length=s.max_caption_tokens, padding="longest", return_tensors="pt")
        input_ids = encoded["input_ids"].long()
        attention_mask = encoded["attention_mask"].long()
        info = self.token_info
        mlm = mask_tokens(
            input_ids,
            mask_token_id=info.mask_token_id,
            vocab_size=info.vocab_size,
            special_token_ids=info.special_token_ids,
            attention_mask=attention_mask,
            generator=generator,
            **self.mlm_kwargs,
        )
        plm = make_prefix_lm_batch(input_ids, attention_mask, generator=generator, **self.plm_kwargs)

        rows = slide.keyword_rows.get(bag_id, np.zeros(0, dtype=np.int64))
        if len(rows) > s.max_keywords:
            rows = np.sort(rng.choice(rows, size=s.max_keywords, replace=False))
        kw = self.store.keyword_features(slide, rows) if len(rows) else None
        dim = kw.shape[1] if kw is not None else self.store.keyword_dim(slide.slide_id)
        keyword_features = np.zeros((s.max_keywords, dim), dtype=np.float16)
        keyword_mask = np.zeros(s.max_keywords, dtype=bool)
        if kw is not None:
            keyword_features[: len(rows)] = kw
            keyword_mask[: len(rows)] = True

        level = slide.level[positions]
        return {
            "features": torch.from_numpy(np.ascontiguousarray(features)),
            "level": torch.from_numpy(level.astype(np.int64)),
            "magnification": torch.tensor([s.magnifications[d] for d in level.tolist()], dtype=torch.float32),
            "parent": torch.from_numpy(parent),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mlm_input_ids": mlm.input_ids,
            "mlm_labels": mlm.labels,
            "plm_labels": plm.labels,
            "plm_prefix": plm.prefix_lengths,
            "keyword_features": torch.from_numpy(keyword_features),
            "keyword_mask": torch.from_numpy(keyword_mask),
            "bag": torch.tensor(index, dtype=torch.long),
        }


def _local_ancestors(ancestor: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Ancestor pointers restricted to one bag, as positions into ``members`` (-1: none)."""
    lookup = {int(m): i for i, m in enumerate(members.tolist())}
    return np.asarray([lookup.get(int(ancestor[m]), -1) for m in members.tolist()], dtype=np.int64)


_TOKEN_FIELDS = {"input_ids": "pad", "attention_mask": 0, "mlm_input_ids": "pad", "mlm_labels": IGNORE_INDEX, "plm_labels": IGNORE_INDEX}


def collate_bags(items: Sequence[dict[str, Tensor]], pad_token_id: int = 0, multiple: int = 8) -> dict[str, Tensor]:
    """Stack items into a batch; caption fields are right-padded to the longest caption
    of the batch, rounded up to ``multiple`` tokens (B, P, L)."""
    length = max(item["input_ids"].shape[1] for item in items)
    length = -(-length // multiple) * multiple
    batch: dict[str, Tensor] = {}
    for key in items[0]:
        if key in _TOKEN_FIELDS:
            fill = pad_token_id if _TOKEN_FIELDS[key] == "pad" else int(_TOKEN_FIELDS[key])
            padded = []
            for item in items:
                t = item[key]
                padded.append(torch.nn.functional.pad(t, (0, length - t.shape[1]), value=fill))
            batch[key] = torch.stack(padded)
        else:
            batch[key] = torch.stack([item[key] for item in items])
    return batch


class BagCollator:
    """Picklable collate function bound to the pad id."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return collate_bags(items, self.pad_token_id)
