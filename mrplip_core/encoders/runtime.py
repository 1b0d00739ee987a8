"""Where and in which precision an encoder runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mrplip_core.encoders.spec import EncoderSpec, Precision

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the current CUDA device when there is one, else CPU; otherwise as given.

    Asking for CUDA on a machine without it is an error (never a silent CPU run).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"features.device is {device!r} but no CUDA device is available")
    return dev


def resolve_precision(precision: str, spec: EncoderSpec, device: torch.device) -> Precision:
    """``auto``: the spec's autocast dtype on GPU, fp32 on CPU; otherwise as given.

    fp16 on CPU is refused (slow and lossy there); bf16 on CPU is allowed when asked for.
    """
    if precision == "auto":
        return spec.precision if device.type == "cuda" else "fp32"
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 is not supported on CPU; use fp32 or bf16")
    return precision  # type: ignore[return-value]


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Autocast to ``precision`` on ``device``; a no-op for fp32."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield
