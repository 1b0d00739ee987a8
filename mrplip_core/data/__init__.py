"""Bags of multi-resolution patch features, captions and keywords for pretraining.

Built on the per-slide artifacts only (tile manifests, feature HDF5 files, caption
Parquet files): :func:`build_bag_index` lists the (slide, bag) pairs, :class:`BagDataset`
reads one bag at a time through a per-worker :class:`SlideStore`, and
:class:`BagStreamSampler` orders them reproducibly across ranks and restarts.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from mrplip_core.data.dataset import BagCollator, BagDataset, TokenizerInfo, collate_bags, item_seed
from mrplip_core.data.index import build_bag_index, slide_split, usable_slides
from mrplip_core.data.sampler import BagStreamSampler
from mrplip_core.data.sampling import allocate_budget, sample_bag
from mrplip_core.data.settings import CorpusPaths, DataSettings
from mrplip_core.data.slide import SlideBags, SlideStore, load_slide


def make_loader(
    dataset: BagDataset, sampler: BagStreamSampler, *, num_workers: int = 0, prefetch_factor: int = 4,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``sampler``'s batches (endless; take as many as needed)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=BagCollator(dataset.token_info.pad_token_id),
        pin_memory=pin_memory,
        **kwargs,
    )


__all__ = [
    "BagCollator",
    "BagDataset",
    "BagStreamSampler",
    "CorpusPaths",
    "DataSettings",
    "SlideBags",
    "SlideStore",
    "TokenizerInfo",
    "allocate_budget",
    "build_bag_index",
    "collate_bags",
    "item_seed",
    "load_slide",
    "make_loader",
    "sample_bag",
    "slide_split",
    "usable_slides",
]
