"""The ``localize`` section of the config (workflow/schemas/config.schema.yaml holds the defaults;
``tests/test_config_defaults.py`` holds this dataclass against it). Plain Python, no torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mrplip_core.config_mapping import from_mapping

#: The demo's queries (config.yaml ``localize.queries``).
DEMO_QUERIES = ("Pink stroma with scattered purple nuclei.", "Small purple nuclei spread evenly through the stroma.")


@dataclass(frozen=True)
class LocalizeSettings:
    """Text-to-region localisation of the workflow's ``localize`` target.

    ``model``: a PathFLIP run name (null: ``pathflip.run``); ``baseline``: an MR-PLIP pretrain
    run localised the same way for comparison (null: none); ``slides``: slide ids (empty: every
    slide of the slide table); ``queries``: the texts; ``top_fraction``: the share of a slide's
    patches (highest scores, at least one) that forms the region written to GeoJSON;
    ``thumbnail_mpp``: um/px of the slide thumbnail under the heatmap PNG.
    """

    model: str | None = None
    baseline: str | None = None
    slides: tuple[str, ...] = ()
    queries: tuple[str, ...] = DEMO_QUERIES
    top_fraction: float = 0.1
    thumbnail_mpp: float = 8.0
    device: str = "cpu"  # cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if not 0.0 < float(self.top_fraction) <= 1.0:
            raise ValueError(f"localize.top_fraction must be in (0, 1], got {self.top_fraction!r}")
        if not float(self.thumbnail_mpp) > 0:
            raise ValueError(f"localize.thumbnail_mpp must be positive (um/px), got {self.thumbnail_mpp!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> LocalizeSettings:
        return from_mapping(cls, dict(values or {}), "localize")
