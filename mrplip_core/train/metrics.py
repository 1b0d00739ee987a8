"""Per-term metrics: averaged over micro-batches and ranks, written to CSV (and TensorBoard).

Ranks may produce different diagnostic keys (a rank whose bags all come from 20x scans
has no 20x-40x MRTVA pairs), so values are reduced as (sum, count) over a key list fixed
at the first step (the union over ranks); a key missing everywhere is written empty.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from mrplip_core.io.atomic import atomic_path
from mrplip_core.train.distributed import DistInfo

log = logging.getLogger(__name__)


def metric_keys(outputs: Mapping[str, Tensor], info: DistInfo, extra: Sequence[str] = ()) -> list[str]:
    """The sorted union of the output keys of all ranks (plus ``extra``)."""
    keys = set(outputs) | set(extra)
    if info.distributed:
        gathered: list[set[str] | None] = [None] * info.world_size
        dist.all_gather_object(gathered, keys)
        keys = set().union(*[g for g in gathered if g])
    order = {"loss": 0, "loss_bl": 1}
    return sorted(keys, key=lambda k: (order.get(k, 2), k))


class MetricAccumulator:
    """Sums scalar tensors per key between two reductions."""

    def __init__(self, keys: Sequence[str], device: torch.device) -> None:
        self.keys = list(keys)
        self.position = {k: i for i, k in enumerate(self.keys)}
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, len(self.keys), dtype=torch.float64, device=self.device)

    def add(self, outputs: Mapping[str, Tensor]) -> None:
        for key, value in outputs.items():
            i = self.position.get(key)
            if i is not None:
                self.sums[0, i] += value.detach().double()
                self.sums[1, i] += 1

    def reduce(self, info: DistInfo) -> dict[str, float]:
        """Mean per key over everything added on every rank; resets the sums."""
        sums = self.sums.clone()
        if info.distributed:
            dist.all_reduce(sums)
        self.reset()
        values = sums.cpu().tolist()
        return {k: (values[0][i] / values[1][i]) if values[1][i] else math.nan for i, k in enumerate(self.keys)}


class MetricsWriter:
    """CSV rows (one per logged step) and optional TensorBoard scalars; rank 0 only.

    On resume at step ``s`` the rows after ``s`` (written after the last checkpoint by a
    killed job) are dropped, so the file reads like one uninterrupted run.
    """

    def __init__(self, path: Path, *, resume_step: int | None, tensorboard_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, str]] = []
        self.header: list[str] = []
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.header = list(reader.fieldnames or [])
                self.rows = [r for r in reader if int(float(r["step"])) <= resume_step]
        self._rewrite()
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir), purge_step=(resume_step or 0) + 1)
            except (ImportError, ModuleNotFoundError):
                log.info("TensorBoard is not installed: metrics go to %s only", self.path)

    def _rewrite(self) -> None:
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.header)
            if self.header:
                writer.writeheader()
                writer.writerows(self.rows)

    def write(self, row: Mapping[str, float | int | str]) -> None:
        text = {k: ("" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}" if isinstance(v, float) else str(v))
                for k, v in row.items()}
        self.rows.append(text)
        new = [k for k in row if k not in self.header]
        if new:
            self.header += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.header).writerow(text)
        if self.tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
