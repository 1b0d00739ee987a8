"""Processes that must not outlive the one that started them.

torchrun starts its workers in sessions of their own, so killing a job's process group
(Snakemake killed, a Slurm step cancelled with SIGKILL) kills torchrun but not them: they would
train on as orphans, holding the GPU and writing checkpoints beside the rerun's. Linux's parent
death signal (``PR_SET_PDEATHSIG``) kills them with their parent. This module imports nothing
heavy, so ``python -m mrplip_core`` sets the signal before torch loads (seconds in which a killed
launcher would otherwise leave an orphan behind).
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where that is not
    available. A process whose parent is already gone (adopted by init) exits at once."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the parent died before the signal was set
        os._exit(1)
    return True


def under_torchrun() -> bool:
    """True in a worker process that torchrun (torch.distributed.elastic) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def die_with_launcher() -> bool:
    """Under torchrun, die with the launcher (:func:`die_with_parent`); a no-op elsewhere."""
    return die_with_parent() if under_torchrun() else False
