"""Trouble of the machine versus trouble of the input.

A per-slide stage records a slide it cannot use (a corrupt file, no mpp) and goes on with the
rest of the cohort. A full disk, a quota, an I/O error or an exhausted memory says nothing about
the slide: the job must fail, so that Snakemake (or Slurm) can retry it once the machine is
fixed, and the slide must not be recorded as bad. :func:`machine_trouble` tells the two apart;
every per-slide ``except`` that records a failure asks it first.
"""

from __future__ import annotations

import errno
import os

#: errno values that say the machine or its file system is in trouble, not the input.
MACHINE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EIO", "ENOSPC", "EDQUOT", "EMFILE", "ENFILE", "ENOMEM", "ESTALE", "EAGAIN",
                                      "EINTR", "ETIMEDOUT", "ENOLCK", "ECONNRESET", "EROFS") if hasattr(errno, name)
)
#: The same in an error's text (``os.strerror``; OpenSlide, OpenCV and HDF5 carry no errno, only
#: the system's words), and OpenCV's failed allocation.
MACHINE_WORDS = tuple(os.strerror(e) for e in sorted(MACHINE_ERRNOS)) + ("Insufficient memory",)


def machine_trouble(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the machine is in trouble.

    True for MemoryError, an OSError whose errno is in :data:`MACHINE_ERRNOS` (ENOSPC, EDQUOT,
    EIO, ENOMEM, ...), or an error whose text holds those errors' words ("No space left on
    device"). Such an error must fail the job, never be recorded as a bad slide.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError):
            return True
        if isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS:
            return True
        if any(words in str(exc) for words in MACHINE_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
