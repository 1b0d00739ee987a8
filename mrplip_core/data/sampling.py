"""Drawing a fixed number of patches from a visual bag along quad-tree paths.

Levels are the configured magnifications, lowest first. At the first level present in the
bag, patches are drawn among the bag's patches of that magnification; at every next level
they are drawn among the *descendants of the patches already drawn*, round-robin over
those ancestors so that the draw spreads over the tree (and only when those are too few,
among the level's other patches). Each drawn patch below the first level therefore has
a drawn ancestor in the sample (the parent/child pairs MRTVA needs).

The number of patches per sample is fixed (``sum(budget)``): the budget of a magnification
the slide lacks (a 20x scan has no 40x patches) moves to the nearest present level, deeper
first; a level with fewer candidates than its budget passes the surplus down, and only the
deepest level repeats patches (drawn with replacement) when the bag is too small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def allocate_budget(available: Sequence[int], budget: Sequence[int]) -> list[int]:
    """Patches to draw per level, given the patches available per level.

    Budget of an empty level moves to the nearest non-empty level (deeper first, then
    shallower); surplus over what a level holds moves to the next deeper non-empty level.
    The total is preserved whenever at least one level is non-empty.
    """
    n = len(budget)
    if len(available) != n:
        raise ValueError("available and budget must have one entry per level")
    present = [i for i in range(n) if available[i] > 0]
    if not present:
        return [0] * n
    out = [0] * n
    for i, b in enumerate(budget):
        deeper = [j for j in present if j >= i]
        target = deeper[0] if deeper else present[-1]
        out[target] += int(b)
    for k, i in enumerate(present[:-1]):  # pass surplus down the tree
        surplus = out[i] - int(available[i])
        if surplus > 0:
            out[i] -= surplus
            out[present[k + 1]] += surplus
    return out


def sample_bag(
    level: np.ndarray,
    ancestor: np.ndarray,
    budget: Sequence[int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``sum(budget)`` patches of one bag.

    Parameters
    ----------
    level: (n,) int, level (index into the configured magnifications) of each of the
        bag's patches.
    ancestor: (n,) int, position (into the same arrays) of each patch's nearest ancestor at
        a configured magnification, -1 for none.
    budget: patches wanted per level.
    rng: source of randomness.

    Returns
    -------
    ``(nodes, parent_slot)``: (P,) positions of the drawn patches, ordered by level, and
    (P,) slot (into ``nodes``) of each one's nearest drawn ancestor, -1 for none.
    """
    n_levels = len(budget)
    by_level = [np.flatnonzero(level == d) for d in range(n_levels)]
    take = allocate_budget([len(b) for b in by_level], budget)
    deepest = max((d for d in range(n_levels) if take[d] > 0), default=-1)
    chosen: list[int] = []
    previous: np.ndarray | None = None  # patches drawn at the last level drawn from
    carry = 0  # patches a level could not supply, passed to the next one
    for d in range(n_levels):
        want = take[d] + carry if take[d] else 0
        if want == 0:
            continue
        candidates = by_level[d]
        under = _descendants_of(candidates, previous, ancestor) if previous is not None else candidates
        picks = _round_robin(under, ancestor, want, rng, previous is not None)
        if len(picks) < want:  # too few below the drawn patches: other patches of the level
            rest = np.setdiff1d(candidates, picks)
            picks = np.concatenate([picks, rng.permutation(rest)[: want - len(picks)].astype(np.int64)])
        if len(picks) < want and d == deepest:  # the bag is too small: repeat patches
            extra = rng.choice(candidates, size=want - len(picks), replace=True)
            picks = np.concatenate([picks, extra.astype(np.int64)])
        carry = want - len(picks)
        chosen.extend(picks.tolist())
        previous = np.unique(picks)
    nodes = np.asarray(chosen, dtype=np.int64)
    slot_of = {}
    for slot, node in enumerate(nodes.tolist()):
        slot_of.setdefault(node, slot)
    parent_slot = np.full(len(nodes), -1, dtype=np.int64)
    for slot, node in enumerate(nodes.tolist()):
        a = int(ancestor[node])
        while a >= 0 and a not in slot_of:
            a = int(ancestor[a])
        parent_slot[slot] = slot_of[a] if a >= 0 else -1
    return nodes, parent_slot


def _descendants_of(candidates: np.ndarray, roots: np.ndarray, ancestor: np.ndarray) -> np.ndarray:
    """The candidates that have one of ``roots`` among their ancestors."""
    roots_set = set(roots.tolist())
    keep = []
    for c in candidates.tolist():
        a = int(ancestor[c])
        while a >= 0 and a not in roots_set:
            a = int(ancestor[a])
        if a >= 0:
            keep.append(c)
    return np.asarray(keep, dtype=np.int64)


def _round_robin(
    candidates: np.ndarray, ancestor: np.ndarray, k: int, rng: np.random.Generator, spread: bool
) -> np.ndarray:
    """Up to ``k`` distinct candidates; with ``spread``, one per ancestor group in turn."""
    if not spread:
        return rng.permutation(candidates)[:k].astype(np.int64)
    groups: dict[int, list[int]] = {}
    for c in rng.permutation(candidates).tolist():
        groups.setdefault(int(ancestor[c]), []).append(c)
    order = list(groups.values())
    picks: list[int] = []
    while len(picks) < k and any(order):
        for group in order:
            if group and len(picks) < k:
                picks.append(group.pop())
    return np.asarray(picks, dtype=np.int64)
