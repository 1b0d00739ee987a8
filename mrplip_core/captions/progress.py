"""A progress bar for logs: one plain line every few seconds, with patches/s and ETA."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("mrplip.captions")


class Progress:
    """Counts finished patches and logs ``[#####.....] done/total  rate patches/s  eta``.

    Lines go to the ``mrplip.captions`` logger (the job's log file), at most one every
    ``interval_s`` seconds, plus a final one; no carriage returns, so logs stay readable.
    """

    def __init__(self, total: int, label: str = "captions", interval_s: float = 10.0, width: int = 30) -> None:
        self.total = int(total)
        self.label = label
        self.interval_s = interval_s
        self.width = width
        self.done = 0
        self.errors = 0
        self.t0 = time.monotonic()
        self._last = self.t0

    def update(self, n: int = 1, error: bool = False) -> None:
        self.done += n
        self.errors += int(error)
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            log.info(self.line())

    @property
    def rate(self) -> float:
        """Patches per second since the start."""
        dt = time.monotonic() - self.t0
        return self.done / dt if dt > 0 else 0.0

    def line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        return (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{100 * frac:.0f}%  {rate:.2f} patches/s  eta {eta_s}  errors {self.errors}")

    def close(self) -> None:
        log.info(self.line() + f"  elapsed {time.monotonic() - self.t0:.1f} s")
