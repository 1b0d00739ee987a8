"""The ``pathflip:`` section of the config, typed (defaults: workflow/schemas/config.schema.yaml)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mrplip_core.config_mapping import from_mapping


@dataclass(frozen=True)
class SubcaptionSettings:
    """How a slide caption becomes sub-captions (section ``pathflip.subcaptions``)."""

    method: str = "rules"  # rules: the deterministic splitter (pathflip/subcaptions.py)
    split_clauses: bool = True  # also split a sentence that lists several findings
    min_words: int = 2  # a shorter piece is joined to its neighbour
    slides_per_job: int = 1  # the job unit of the subcaptions stage

    def __post_init__(self) -> None:
        if self.method != "rules":
            raise ValueError(f"pathflip.subcaptions.method: only 'rules' is available, got {self.method!r}")
        if self.min_words < 1 or self.slides_per_job < 1:
            raise ValueError("pathflip.subcaptions: min_words and slides_per_job must be >= 1")


#: Keys of the ``pathflip`` section that configure the training run, typed by
#: mrplip_core.train.pathflip_config (a higher layer); the sub-captions stage ignores them.
TRAINING_KEYS = ("run", "seed", "data", "model", "loss", "optim", "train", "resources")


@dataclass(frozen=True)
class PathflipSettings:
    """What the PathFLIP stages read from the config (section ``pathflip``)."""

    captions: str | None = None  # CSV/TSV/Parquet with slide_id, caption; None: the slide table's column
    max_caption_chars: int = 10000  # a longer caption is recorded as too_long and left out
    subcaptions: SubcaptionSettings = field(default_factory=SubcaptionSettings)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PathflipSettings:
        d = {k: v for k, v in dict(d or {}).items() if k not in TRAINING_KEYS}
        sub = from_mapping(SubcaptionSettings, d.pop("subcaptions", None), "pathflip.subcaptions")
        return from_mapping(cls, {**d, "subcaptions": sub}, "pathflip")
