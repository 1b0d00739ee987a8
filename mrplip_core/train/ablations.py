"""Ablation runs: the ``pretrain`` config section with a few keys changed, one run per entry.

``ablations: {no-mrtva: {loss: {weights: {mrtva: 0.0}}}}`` makes a run ``no-mrtva`` that is
the ``pretrain`` section with only that weight changed; the evaluation stage compares every
run with ``pretrain.run`` and with the frozen encoder.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied key by key: nested mappings merge, anything else
    (lists included) replaces. Neither argument is modified."""
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand_runs(pretrain: Mapping[str, Any], ablations: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Run name -> its full pretrain section: ``pretrain['run']`` first, then each ablation.

    Errors name the entry: a name that is not a valid run name or repeats ``pretrain.run``,
    an entry that is not a mapping, or one that tries to change ``run``.
    """
    main = str(pretrain.get("run", "default"))
    runs: dict[str, dict[str, Any]] = {main: copy.deepcopy(dict(pretrain))}
    for name, changes in (ablations or {}).items():
        where = f"config ablations.{name}"
        if not RUN_NAME.match(str(name)):
            raise ValueError(f"{where}: a run name may hold letters, digits and ._- only")
        if name == main:
            raise ValueError(f"{where}: the name is pretrain.run's; give the ablation its own run name")
        if changes is not None and not isinstance(changes, Mapping):
            raise ValueError(f"{where}: expected a mapping of pretrain keys to change, got {type(changes).__name__}")
        if "run" in (changes or {}):
            raise ValueError(f"{where}: 'run' cannot be changed (the entry's name is its run name)")
        if "resources" in (changes or {}):
            raise ValueError(f"{where}: 'resources' cannot be changed (every run is the same job as pretrain.run; "
                             "change pretrain.resources)")
        runs[str(name)] = merged(pretrain, {**(changes or {}), "run": str(name)})
    return runs
