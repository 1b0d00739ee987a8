"""Checkpoints that resume exactly and load without unpickling.

Layout of ``results/pretrain/{run}/checkpoints/``::

    step_00001000/model.safetensors   every parameter and buffer (model and loss modules)
    step_00001000/state.pt            step, data position, optimizer, scheduler, config
    step_00001000/rng_rank{r}.pt      RNG states of rank r (torch CPU/CUDA, numpy, python)
    latest                            text: the name of the newest complete checkpoint

``state.pt`` and ``rng_rank*.pt`` hold only tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` reads them (nothing is unpickled). A checkpoint is
written into ``.step_XXXXXXXX.tmp`` and renamed when complete; ``latest`` is replaced
atomically after that, so a job killed while saving resumes from the previous one.
Multi-node runs need the run folder on a shared filesystem (each rank writes its RNG file).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mrplip_core.io.atomic import write_text
from mrplip_core.train.distributed import DistInfo, barrier

LATEST = "latest"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and numbers."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": float("nan") if py_gauss is None else float(py_gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached_gaussian"]))
    gauss = state["python_gauss"]
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     None if gauss != gauss else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tensors_for_safetensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors, none sharing memory."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(
    run_dir: Path, step: int, module: nn.Module, state: dict[str, Any], info: DistInfo, keep_last: int = 3
) -> Path:
    """Write checkpoint ``step`` (all ranks call this; rank 0 writes the shared parts)."""
    root = checkpoint_dir(run_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(info)
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        save_file(tensors_for_safetensors(module), str(tmp / "model.safetensors"), metadata={"step": str(step)})
        torch.save({**state, "step": step, "world_size": info.world_size}, tmp / "state.pt")
    barrier(info)
    if info.is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_text(name + "\n", root / LATEST)
        _prune(root, keep_last)
    barrier(info)
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[: max(0, len(done) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_dir(run_dir) / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(path: Path, module: nn.Module, info: DistInfo) -> dict[str, Any]:
    """Load weights into ``module`` and this rank's RNG; return ``state.pt`` (weights_only)."""
    module.load_state_dict(load_file(str(path / "model.safetensors"), device="cpu"), strict=True)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rng_file = path / f"rng_rank{info.rank}.pt"
    if state.get("world_size") == info.world_size and rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state
