"""Settings of the bag dataset (config section ``pretrain.data``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mrplip_core.encoders.catalog import DEFAULT_IMAGE_ENCODER
from mrplip_core.layout import Layout


@dataclass(frozen=True)
class DataSettings:
    """Where the per-slide artifacts are and how a training sample is drawn from a bag.

    A *sample* is one visual bag (a 5x parent and its descendants). From it,
    ``patches_per_magnification[i]`` patches are drawn at ``magnifications[i]``, each one a
    descendant of a patch drawn at the previous magnification (quad-tree paths), so every
    drawn patch above the first magnification has its parent (or nearest ancestor) in the
    sample. A step therefore costs the same whatever the bag size.
    """

    results: str = "results"  # the workflow's results folder (tiles/, features/, ...)
    image_encoder: str = DEFAULT_IMAGE_ENCODER  # results/features/{image_encoder}/{slide}.h5
    text_encoder: str = "minilm"  # results/text_features/{text_encoder}/{slide}.h5 (keywords)
    magnifications: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)  # x; a subset is an ablation
    patches_per_magnification: tuple[int, ...] = (1, 2, 2, 2)  # drawn per bag, per magnification
    max_keywords: int = 32  # keywords of the textual bag per sample (random subset when more)
    max_caption_tokens: int = 64  # captions are truncated to this many tokens ([CLS]/[SEP] incl.)
    val_fraction: float = 0.0  # share of slides held out for validation (split by slide; real: 0.02)
    split_seed: int = 0  # seed of the slide split (stable when slides are added)
    batch_size: int = 4  # bags per rank per micro-step (global batch = this x ranks x accumulation)
    num_workers: int = 1  # DataLoader worker processes per rank
    prefetch_factor: int = 4  # batches prefetched per worker
    slide_cache: int = 64  # slides (trees, captions, open HDF5 handles) cached per worker
    shuffle_window: int = 0  # slides per shuffle window (locality for big cohorts); 0: global shuffle

    def __post_init__(self) -> None:
        if len(self.magnifications) != len(self.patches_per_magnification):
            raise ValueError(
                "pretrain.data.patches_per_magnification must have one entry per magnification: "
                f"{list(self.magnifications)} vs {list(self.patches_per_magnification)}"
            )
        mags = [float(m) for m in self.magnifications]
        if not mags or mags != sorted(set(mags)):
            raise ValueError(f"pretrain.data.magnifications must be increasing, got {mags}")
        if any(n < 0 for n in self.patches_per_magnification) or sum(self.patches_per_magnification) < 1:
            raise ValueError("pretrain.data.patches_per_magnification must be >= 0 with a positive sum")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"pretrain.data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or self.max_keywords < 1 or self.max_caption_tokens < 4:
            raise ValueError("pretrain.data: batch_size, max_keywords >= 1 and max_caption_tokens >= 4")
        object.__setattr__(self, "magnifications", tuple(mags))
        object.__setattr__(self, "patches_per_magnification", tuple(int(n) for n in self.patches_per_magnification))

    @property
    def patches_per_bag(self) -> int:
        """P: patches per sample (fixed, whatever the bag)."""
        return sum(self.patches_per_magnification)

    def paths(self) -> CorpusPaths:
        return CorpusPaths(Path(self.results), self.image_encoder, self.text_encoder)


@dataclass(frozen=True)
class CorpusPaths:
    """The per-slide artifacts the pretraining stage reads, for one pair of encoders.

    Every path comes from :class:`~mrplip_core.layout.Layout` (``results`` is its root).
    """

    results: Path
    image_encoder: str
    text_encoder: str

    @property
    def layout(self) -> Layout:
        return Layout(self.results)

    @property
    def slides(self) -> Path:
        return self.layout.slides_table

    def manifest(self, slide_id: str) -> Path:
        return self.layout.tiles(slide_id)

    def image_features(self, slide_id: str) -> Path:
        return self.layout.image_features(self.image_encoder, slide_id)

    def text_features(self, slide_id: str) -> Path:
        return self.layout.text_features(self.text_encoder, slide_id)

    def captions(self, slide_id: str) -> Path:
        return self.layout.captions(slide_id)

    def slide_files(self, slide_id: str) -> dict[str, Path]:
        return {
            "manifest": self.manifest(slide_id),
            "image_features": self.image_features(slide_id),
            "text_features": self.text_features(slide_id),
            "captions": self.captions(slide_id),
        }
