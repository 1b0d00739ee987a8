"""The ``pathflip:`` section of the config, typed (defaults: workflow/schemas/config.schema.yaml)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mrplip_core.config_mapping import from_mapping
from mrplip_core.serving.settings import OpenAIParams, ServerParams

#: The instruction sent before the caption (``pathflip.subcaptions.llm.prompt``).
DEFAULT_LLM_PROMPT = (
    "Split the pathology report below into its findings: short descriptions of one region or one "
    "observation each (a tissue, a lesion, a margin, a grade, a stain result). Quote the report's own "
    "words wherever you can. Answer with JSON only: {\"findings\": [{\"text\": \"...\"}, ...]}."
)

METHODS = ("rules", "llm")


@dataclass(frozen=True)
class LLMSplitSettings:
    """The language-model splitter (``pathflip.subcaptions.llm``; used when ``method: llm``)."""

    model: str | None = None  # model folder a job's server is started on (or the served name, with base_url)
    prompt: str = DEFAULT_LLM_PROMPT  # the instruction; the caption follows it
    structured_output: bool = True  # ask the server to decode only JSON of the findings schema
    max_findings: int = 32  # the schema's maxItems
    max_finding_chars: int = 500  # the schema's maxLength of one finding
    max_tokens: int = 2048  # new tokens per slide
    temperature: float = 0.0  # 0: greedy
    openai: OpenAIParams = field(default_factory=OpenAIParams)  # client and server (mrplip_core.serving)
    gpus: int | None = None  # GPUs per job; None: 1 when the job starts its own server, else 0
    mem_mb: int = 16000  # per job (the server runs inside the job)
    runtime: int = 120  # minutes per job (Slurm)

    def __post_init__(self) -> None:
        if self.max_findings < 1 or self.max_finding_chars < 1 or self.max_tokens < 1:
            raise ValueError("pathflip.subcaptions.llm: max_findings, max_finding_chars and max_tokens must be >= 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LLMSplitSettings:
        d = dict(d or {})
        where = "pathflip.subcaptions.llm.openai"
        openai = dict(d.pop("openai", None) or {})
        server = from_mapping(ServerParams, openai.pop("server", None), f"{where}.server")
        return from_mapping(cls, {**d, "openai": from_mapping(OpenAIParams, {**openai, "server": server}, where)},
                            "pathflip.subcaptions.llm")


@dataclass(frozen=True)
class SubcaptionSettings:
    """How a slide caption becomes sub-captions (section ``pathflip.subcaptions``)."""

    # rules: the deterministic splitter (pathflip/subcaptions.py); llm: a language model
    # (pathflip/llm_split.py), with the rules as the fallback for a slide whose answer is invalid
    method: str = "rules"
    split_clauses: bool = True  # also split a sentence that lists several findings
    min_words: int = 2  # rules: a shorter piece is joined to its neighbour; llm: a shorter finding is invalid
    slides_per_job: int = 1  # the job unit of the subcaptions stage
    llm: LLMSplitSettings = field(default_factory=LLMSplitSettings)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"pathflip.subcaptions.method must be one of {list(METHODS)}, got {self.method!r}")
        if self.min_words < 1 or self.slides_per_job < 1:
            raise ValueError("pathflip.subcaptions: min_words and slides_per_job must be >= 1")
        if self.method == "llm" and not self.llm.model and not self.llm.openai.base_url:
            raise ValueError("pathflip.subcaptions.method 'llm' needs pathflip.subcaptions.llm.model (to start a "
                             "server) or pathflip.subcaptions.llm.openai.base_url (a server you run)")

    @property
    def job_gpus(self) -> int:
        """GPUs per job: ``llm.gpus`` if set, else 1 when the job starts its own server, 0 otherwise."""
        if self.method != "llm":
            return 0
        if self.llm.gpus is not None:
            return int(self.llm.gpus)
        return 0 if self.llm.openai.base_url else 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SubcaptionSettings:
        d = dict(d or {})
        llm = LLMSplitSettings.from_dict(d.pop("llm", None))
        return from_mapping(cls, {**d, "llm": llm}, "pathflip.subcaptions")


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
        sub = SubcaptionSettings.from_dict(d.pop("subcaptions", None))
        return from_mapping(cls, {**d, "subcaptions": sub}, "pathflip")
