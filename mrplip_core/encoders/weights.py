"""Reading weights from local files, strictly, and fingerprinting them.

Nothing here touches the network. A checkpoint is a ``.safetensors`` file or a pickled
state dict read with ``torch.load(weights_only=True)`` (which refuses arbitrary objects).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Suffixes read with torch.load(weights_only=True).
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")

RANDOM_INIT = "random-init"


class WeightsError(RuntimeError):
    """Weights cannot be used with an encoder; the message names the file and the keys."""


@dataclass(frozen=True)
class WeightsInfo:
    """Where an encoder's weights came from, recorded in every output's attrs."""

    source: str  # the local file read, or "random-init"
    sha256: str  # of the checkpoint file; of the state dict's bytes for random-init
    dtype: str  # dtype of the checkpoint's floating tensors (the model always runs from fp32)
    seed: int | None = None  # torch seed of a random init

    @property
    def random(self) -> bool:
        return self.source == RANDOM_INIT

    def attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": self.source, "weights_sha256": self.sha256, "weights_dtype": self.dtype}
        if self.seed is not None:
            out["weights_seed"] = int(self.seed)
        return out


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB chunks (same as ``sha256sum``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: Files at least this large have their digest cached (hashing UNI2-h's 2.7 GB takes seconds,
#: once per job otherwise: 20,000 slide jobs would spend GPU-node hours on it).
CACHE_MIN_BYTES = 64 << 20


def _digest_cache_dir() -> Path:
    base = os.environ.get("MRPLIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mrplip"
    )
    return Path(base) / "sha256"


def weights_sha256(path: str | Path) -> str:
    """:func:`file_sha256`, cached for large files under ``$MRPLIP_CACHE_DIR`` (default
    ``~/.cache/mrplip``), keyed by the file's real path, size, mtime and inode, so a changed
    or replaced file is hashed again. An unwritable cache only costs the re-hash.
    """
    path = Path(path)
    st = path.stat()
    if st.st_size < CACHE_MIN_BYTES:
        return file_sha256(path)
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    entry = _digest_cache_dir() / (hashlib.sha256(key.encode()).hexdigest() + ".txt")
    try:
        cached_key, digest = entry.read_text().split("\n")[:2]
        if cached_key == key and len(digest) == 64:
            return digest
    except (OSError, ValueError):
        pass
    digest = file_sha256(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(f"{key}\n{digest}\n")
        os.replace(tmp, entry)
    except OSError:
        pass
    return digest


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over a state dict: each key (sorted), its dtype, shape and raw bytes.

    The fingerprint of weights that exist only in memory (a seeded random init).
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, on CPU.

    ``.safetensors`` is read with safetensors; ``.bin/.pth/.pt/.ckpt`` with
    ``torch.load(weights_only=True)``. A training checkpoint that wraps the weights as
    ``{"state_dict": {...}}`` is unwrapped, and a ``module.`` prefix that every key carries
    (DistributedDataParallel) is removed.

    Raises
    ------
    WeightsError: the file is missing, of an unknown kind, or holds something other than
        a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        elif suffix in PICKLE_SUFFIXES:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(
                f"{path}: unknown weights format {suffix!r} (expected .safetensors or {', '.join(PICKLE_SUFFIXES)})"
            )
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling and safetensors raise many kinds
        raise WeightsError(f"{path}: cannot read weights: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: expected a non-empty mapping of parameter names to tensors, got {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{path}: entries that are not tensors: {_names(not_tensors)}")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def keys_under(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with ``prefix``, the prefix removed (empty when none does).

    Selects one tower from the checkpoint of a whole model (``visual.`` of a CoCa model).
    """
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def check_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    ignore: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Compare checkpoint keys and shapes with ``model``'s; return the dict to load.

    Keys in ``ignore`` are dropped from the checkpoint first. Any key the model has and the
    checkpoint lacks, any key the checkpoint has and the model lacks, and any shape that
    differs is an error; the message names them (``what`` says which encoder and file).
    Works on a model built on the meta device (only names and shapes are read).
    """
    ignore = set(ignore)
    sd = {k: v for k, v in state_dict.items() if k not in ignore}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(sd) & set(expected))
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_names(mismatched)}")
    if problems:
        raise WeightsError(f"{what}: weights do not fit the architecture: " + "; ".join(problems))
    return sd


def checkpoint_dtype(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The dtype of a state dict's floating-point tensors ("float32", "bfloat16", "mixed")."""
    kinds = {str(t.dtype).removeprefix("torch.") for t in state_dict.values() if t.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")


def _names(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
