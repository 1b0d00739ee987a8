"""The captioning backend named by ``captions.backend``.

Its own module, so that :mod:`~mrplip_core.captions.backends` (the interface every backend
imports) imports no backend: the language-model backends load their heavy libraries only
when chosen.
"""

from __future__ import annotations

from pathlib import Path

from mrplip_core.captions.backends import Captioner, MorphologyBackend
from mrplip_core.captions.settings import CaptionSettings


def make_backend(settings: CaptionSettings, log_dir: str | Path | None = None) -> Captioner:
    """The backend named by ``settings.backend`` (not yet entered)."""
    if settings.backend == "morphology":
        return MorphologyBackend(settings)
    if settings.backend == "openai":
        from mrplip_core.captions.openai_backend import OpenAIBackend

        return OpenAIBackend(settings, log_dir=log_dir)
    if settings.backend == "transformers":
        from mrplip_core.captions.transformers_backend import TransformersBackend

        return TransformersBackend(settings)
    raise ValueError(f"unknown captions.backend {settings.backend!r}")
