"""Settings of the captioning stage: the ``captions:`` section of config.yaml as dataclasses.

The defaults here equal those of ``workflow/schemas/config.schema.yaml`` (a test checks it),
so ``mrplip captions`` run by hand behaves like the workflow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal

from mrplip_core.serving.settings import OpenAIParams
from mrplip_core.wsi.magnification import format_magnification

Backend = Literal["morphology", "openai", "transformers"]

#: The prompt of the MR-PLIP paper (used for Quilt-LLaVA at every magnification there).
PAPER_PROMPT = "Can you describe the main features visible in this histopathology image?"

DEFAULT_PROMPTS: dict[str, str] = {
    "default": PAPER_PROMPT,
    "5x": (
        "Can you describe the main features visible in this low-magnification (5x) histopathology "
        "image? Focus on the tissue architecture: which tissues are present, how they are arranged, "
        "and any glands, vessels, necrosis or other large structures."
    ),
    "10x": (
        "Can you describe the main features visible in this histopathology image at 10x? Focus on "
        "the architecture and organisation of the tissue: glands, stroma, inflammatory infiltrates "
        "and the borders between regions."
    ),
    "20x": (
        "Can you describe the main features visible in this histopathology image at 20x? Focus on "
        "the cells: which cell types are present, the size and shape of their nuclei, and how the "
        "cells are arranged."
    ),
    "40x": (
        "Can you describe the main features visible in this high-magnification (40x) histopathology "
        "image? Focus on cellular and nuclear detail: nuclear size and shape, chromatin, nucleoli, "
        "mitoses and cytoplasm."
    ),
}


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters sent with every request (and passed to ``generate()``)."""

    max_tokens: int = 256  # new tokens per caption
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # sampling seed (ignored when greedy)


@dataclass(frozen=True)
class ImageParams:
    """How a patch is turned into the image a captioner sees."""

    # jpeg: ~10x cheaper to encode than png and ~5x smaller on the wire, which matters when the
    # client shares CPU cores with the server; png: lossless, for comparing pixels exactly
    format: Literal["png", "jpeg"] = "jpeg"
    jpeg_quality: int = 90
    max_px: int | None = None  # downscale patches larger than this (px side); None: as tiled


@dataclass(frozen=True)
class TransformersParams:
    """In-process ``generate()`` of the ``transformers`` backend."""

    batch_size: int = 8
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16


@dataclass(frozen=True)
class KeywordParams:
    """Keyword extraction for textual bags."""

    max_phrase_words: int = 3  # longer stopword-free runs are split into chunks of this size
    min_chars: int = 3  # shorter words are dropped
    extra_stopwords: tuple[str, ...] = (
        "image", "images", "histopathology", "histology", "feature", "visible", "show", "shows",
        "seen", "appear", "appears", "present", "field", "view", "magnification", "sample",
        "slide", "overall", "also", "likely", "suggest", "suggests", "suggesting", "indicate",
        "indicates", "indicating", "consistent", "noted", "observed",
    )


@dataclass(frozen=True)
class CaptionSettings:
    """The ``captions:`` section of the config."""

    backend: Backend = "morphology"
    model: str | None = None  # model directory (or served model name with openai.base_url)
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    generation: GenerationParams = field(default_factory=GenerationParams)
    image: ImageParams = field(default_factory=ImageParams)
    openai: OpenAIParams = field(default_factory=OpenAIParams)  # client and server (mrplip_core.serving)
    transformers: TransformersParams = field(default_factory=TransformersParams)
    keywords: KeywordParams = field(default_factory=KeywordParams)
    io_threads: int = 4  # threads reading and encoding patches
    flush_rows: int = 256  # write a part file every this many new captions ...
    flush_seconds: float = 60.0  # ... or this often, whichever comes first
    retry_errors: bool = True  # a rerun requests again the patches recorded with an error
    max_error_fraction: float = 0.0  # more failed patches than this fails the slide (parts kept)
    slides_per_job: int = 1  # slides captioned by one job (one server start)
    gpus: int | None = None  # GPUs a captions job asks the scheduler for; None: job_gpus decides
    mem_mb: int = 8000
    runtime: int = 720  # minutes per job (Slurm)

    def __post_init__(self) -> None:
        if self.backend not in ("morphology", "openai", "transformers"):
            raise ValueError(f"captions.backend must be morphology, openai or transformers, got {self.backend!r}")
        if "default" not in self.prompts:
            raise ValueError("captions.prompts needs a 'default' prompt")
        if self.backend == "transformers" and not self.model:
            raise ValueError("captions.backend 'transformers' needs captions.model (an HF LLaVA directory)")
        if self.backend == "openai" and not self.model and not self.openai.base_url:
            raise ValueError("captions.backend 'openai' needs captions.model (to start a server) "
                             "or captions.openai.base_url (a server you run)")

    # -- derived -------------------------------------------------------------------------
    @property
    def job_gpus(self) -> int:
        """GPUs per job: ``gpus`` if set, else 1 when the job runs a model itself (a server it
        starts, or transformers on a non-CPU device) and 0 otherwise."""
        if self.gpus is not None:
            return int(self.gpus)
        if self.backend == "openai" and not self.openai.base_url:
            return 1
        if self.backend == "transformers" and self.transformers.device != "cpu":
            return 1
        return 0

    def prompt_for(self, magnification: float) -> str:
        """The prompt for a patch at ``magnification`` (x): its ``'<m>x'`` entry, else ``default``."""
        return self.prompts.get(format_magnification(float(magnification)), self.prompts["default"])

    def digest(self) -> str:
        """Hash of everything that changes a caption; part files made under another are stale.

        The morphology captioner reads pixels and ignores the model, generation and request
        image settings; for it only the backend and the prompts (recorded in every row) count.
        """
        if self.backend == "morphology":
            relevant = {"backend": self.backend, "prompts": self.prompts}
            return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
        relevant = {
            "backend": self.backend,
            "model": self.model,
            "prompts": self.prompts,
            "generation": asdict(self.generation),
            "image": asdict(self.image),
        }
        if self.backend == "openai":
            relevant["base_url"] = self.openai.base_url
            relevant["model_name"] = self.openai.model_name
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keywords"]["extra_stopwords"] = list(self.keywords.extra_stopwords)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> CaptionSettings:
        """Build from the config section; unknown keys are an error that names them."""
        return _build(cls, dict(d or {}), "captions")


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(kind)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = _default_of(known[name])
        if is_dataclass(default) and isinstance(value, dict):
            value = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        elif name == "prompts" and isinstance(value, dict):
            value = {str(k): str(v) for k, v in value.items()}
        kwargs[name] = value
    return kind(**kwargs)


def _default_of(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default
