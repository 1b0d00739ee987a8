"""The ``features:`` section of the config, typed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mrplip_core.encoders.catalog import DEFAULT_IMAGE_ENCODER


@dataclass(frozen=True)
class FeatureSettings:
    """Everything the features stage reads from the config (section ``features``).

    The defaults equal the schema's (workflow/schemas/config.schema.yaml).
    """

    image_encoder: str = DEFAULT_IMAGE_ENCODER  # registry name the stage target extracts
    text_encoder: str = "minilm"  # registry name for keywords and captions
    weights: Mapping[str, str] = field(default_factory=dict)  # encoder name -> local weights path
    allow_random_init: bool = True  # a real encoder without weights runs with random weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    batch_size: int = 256  # patches per forward pass
    text_batch_size: int = 512  # texts per forward pass
    num_workers: int | None = None  # DataLoader workers; None: the job's threads
    threads: int = 8  # cores per features job (the rule's threads)
    mem_mb: int = 16000  # memory per job (rule resources)
    runtime: int = 60  # minutes per job (rule resources)
    gpu: int = 1  # GPUs per job (rule resources; ignored by a local run)
    slides_per_job: int = 1  # image-feature slides per job (one encoder load per job)
    read: str = "manifest"  # manifest (exact patch, then resized) | pyramid (read at input px)
    channels_last: bool = True  # channels_last input and model memory format
    compile: bool = False  # torch.compile the encoder
    failures_fatal: bool = False  # the top-level key: raise instead of recording a failed slide

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> FeatureSettings:
        """From the config's plain dict; unknown keys are an error naming them."""
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown key(s) in features: {sorted(unknown)}")
        if "weights" in d:
            d["weights"] = {str(k): str(v) for k, v in (d["weights"] or {}).items() if v}
        return cls(**d)

    def weights_for(self, encoder: str, weights_key: str | None = None) -> str | None:
        """The configured weights of ``encoder`` (or of the entry it shares weights with)."""
        return self.weights.get(encoder) or (self.weights.get(weights_key) if weights_key else None)

    def workers(self, threads: int | None = None) -> int:
        """DataLoader workers: ``num_workers`` when set, else the job's threads."""
        if self.num_workers is not None:
            return max(0, int(self.num_workers))
        return max(0, int(threads if threads is not None else self.threads))
