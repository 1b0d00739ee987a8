"""``mrplip pretrain``: the verb the Snakemake rule launches under ``torchrun``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m mrplip_core pretrain \\
        --config config.yaml --set train.steps=1000 --set loss.weights.plm=0

Config resolution: defaults <- ``--config`` (its ``pretrain:`` section) <- ``--settings``
(JSON, what the rule passes) <- ``--set KEY=VALUE`` (dotted keys, YAML values).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from mrplip_core.lifetime import die_with_launcher


def _train_verb(a: argparse.Namespace, section_name: str, load: Callable[..., Any], train: Callable[[], Callable]) -> int:
    """One training verb: resolve the ``section_name`` section, print it or train (``train()``
    returns the family's entry point, imported only when it runs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mrplip_core.jobs import read_sections

    try:
        section = read_sections(a.settings, section_name, verb=section_name)[section_name] if a.settings else None
        config = load(a.config, json.dumps(section) if section else None, a.set or [])
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"mrplip {section_name}: invalid config: {exc}", file=sys.stderr)
        return 2
    if a.print_config:
        import yaml

        print(yaml.safe_dump({section_name: config.to_dict()}, sort_keys=False))
        return 0
    die_with_launcher()  # again, for a caller that did not come through python -m mrplip_core
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", stream=sys.stderr)
    try:
        summary = train()(config, a.run_dir)
    except ValueError as exc:  # no usable data, a config that cannot resume: one clear line
        print(f"mrplip {section_name}: {exc}", file=sys.stderr)
        return 1
    if rank == 0:
        last = summary["history"][-1] if summary["history"] else {}
        print(json.dumps({k: v for k, v in summary.items() if k != "history"} | {"last": last}, default=str))
    return 0


def _cmd_pretrain(a: argparse.Namespace) -> int:
    from mrplip_core.train.config import load_config

    def entry() -> Callable:
        from mrplip_core.train.trainer import pretrain

        return pretrain

    return _train_verb(a, "pretrain", load_config, entry)


def _cmd_pathflip(a: argparse.Namespace) -> int:
    from mrplip_core.train.pathflip_config import load_pathflip_config

    def entry() -> Callable:
        from mrplip_core.train.pathflip import train_pathflip

        return train_pathflip

    return _train_verb(a, "pathflip", load_pathflip_config, entry)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` and ``pathflip`` verbs to the ``mrplip`` command's subparsers."""
    s = sub.add_parser("pretrain", help="MR-PLIP pretraining over feature files (run under torchrun for DDP)")
    s.add_argument("--config", default=None, help="YAML file with a pretrain: section (e.g. config.yaml or a run's config.yaml)")
    s.add_argument("--settings", default=None, help="JSON of the config sections the stage uses: {\"pretrain\": {...}} (the Snakemake rule passes "
                        "the run's resolved section)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.steps=100 (repeatable)")
    s.add_argument("--run-dir", default=None, help="output folder (default RESULTS/pretrain/RUN)")
    s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    s.set_defaults(func=_cmd_pretrain)

    s = sub.add_parser("pathflip", help="PathFLIP training over slide captions, sub-captions and patch features "
                                         "(run under torchrun for DDP)")
    s.add_argument("--config", default=None, help="YAML file with a pathflip: section (config.yaml or a run's config.yaml)")
    s.add_argument("--settings", default=None, help="JSON {\"pathflip\": {...}}: the run's resolved training keys "
                                                    "(what the Snakemake rule passes)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.steps=100 (repeatable)")
    s.add_argument("--run-dir", default=None, help="output folder (default RESULTS/pathflip/RUN)")
    s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    s.set_defaults(func=_cmd_pathflip)
