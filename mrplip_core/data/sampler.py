"""A resumable, distributed batch sampler over an endless stream of bags.

The stream is the concatenation of seeded permutations of the index, one per epoch.
Global batch ``t`` is stream elements ``[t * G, (t + 1) * G)`` with ``G = batch_size x
world_size``; rank ``r`` takes the ``r``-th block of ``batch_size`` of them. The position
in the data is therefore one integer, the number of batches consumed, and a run resumed at
batch ``t`` (any number of workers) sees what the uninterrupted run saw. Because the
global batch does not depend on the world size, one process with ``batch_size = G``
sees the same bags per step as ``W`` processes with ``G / W`` each.

Elements are ``(epoch, index)`` keys for :class:`mrplip_core.data.dataset.BagDataset`.

Locality (``window``): reading a bag means loading its slide's tree, captions and row maps
(tens of ms) unless the worker's LRU cache holds the slide. With 20,000 slides in random
order that never happens; with ``window = W`` each epoch permutes the slides, cuts them
into windows of W slides and shuffles the bags within each window, so a batch mixes
bags of up to W slides and every slide is loaded about once per window per worker.
``window = 0`` shuffles all bags globally.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class BagStreamSampler:
    """Yields lists of ``(epoch, index)`` keys, one list per batch of this rank.

    Parameters
    ----------
    num_bags: size of the index.
    batch_size: bags per rank per batch.
    rank, world_size: this process in the group.
    seed: seed of the per-epoch permutations.
    start: batches already consumed (resume position).
    shuffle: False streams the index in order (validation).
    groups: slide number of every bag (needed for ``window``).
    window: slides per shuffle window (see the module docstring); 0: global shuffle.
    """

    def __init__(
        self,
        num_bags: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start: int = 0,
        shuffle: bool = True,
        groups: Sequence[int] | None = None,
        window: int = 0,
    ) -> None:
        if num_bags < 1:
            raise ValueError("the bag stream needs at least one bag")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_bags = num_bags
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = start
        self.shuffle = shuffle
        self.window = int(window)
        self.groups = torch.as_tensor(np.asarray(groups), dtype=torch.long) if groups is not None else None
        if self.window and (self.groups is None or len(self.groups) != num_bags):
            raise ValueError("a shuffle window needs the slide (group) of every bag")
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.num_bags, generator=g)
                if self.window:
                    assert self.groups is not None
                    n_groups = int(self.groups.max()) + 1
                    slide_order = torch.empty(n_groups, dtype=torch.long)
                    slide_order[torch.randperm(n_groups, generator=g)] = torch.arange(n_groups)
                    window_of_bag = slide_order[self.groups] // self.window
                    # stable sort by window keeps the random order inside each window
                    self._perm = self._perm[torch.sort(window_of_bag[self._perm], stable=True).indices]
            else:
                self._perm = torch.arange(self.num_bags)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def element(self, k: int) -> tuple[int, int]:
        """The ``(epoch, index)`` key at stream position ``k``."""
        epoch, offset = divmod(k, self.num_bags)
        return epoch, int(self._permutation(epoch)[offset])

    def batch(self, t: int) -> list[tuple[int, int]]:
        """This rank's keys of global batch ``t``."""
        first = t * self.global_batch_size + self.rank * self.batch_size
        return [self.element(k) for k in range(first, first + self.batch_size)]

    def epoch_of(self, t: int) -> float:
        """Epochs completed at the end of global batch ``t`` (fractional)."""
        return (t + 1) * self.global_batch_size / self.num_bags

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        t = self.start
        while True:
            yield self.batch(t)
            t += 1
