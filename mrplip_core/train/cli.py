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


def _cmd_pretrain(a: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mrplip_core.jobs import read_sections
    from mrplip_core.train.config import load_config

    try:
        section = read_sections(a.settings, "pretrain", verb="pretrain")["pretrain"] if a.settings else None
        config = load_config(a.config, json.dumps(section) if section else None, a.set or [])
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"mrplip pretrain: invalid config: {exc}", file=sys.stderr)
        return 2
    if a.print_config:
        import yaml

        print(yaml.safe_dump({"pretrain": config.to_dict()}, sort_keys=False))
        return 0
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", stream=sys.stderr)
    from mrplip_core.train.trainer import pretrain

    summary = pretrain(config, a.run_dir)
    if rank == 0:
        last = summary["history"][-1] if summary["history"] else {}
        print(json.dumps({k: v for k, v in summary.items() if k != "history"} | {"last": last}, default=str))
    return 0


def _cmd_pathflip(a: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mrplip_core.jobs import read_sections
    from mrplip_core.train.pathflip_config import load_pathflip_config

    try:
        section = read_sections(a.settings, "pathflip", verb="pathflip")["pathflip"] if a.settings else None
        config = load_pathflip_config(a.config, json.dumps(section) if section else None, a.set or [])
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"mrplip pathflip: invalid config: {exc}", file=sys.stderr)
        return 2
    if a.print_config:
        import yaml

        print(yaml.safe_dump({"pathflip": config.to_dict()}, sort_keys=False))
        return 0
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", stream=sys.stderr)
    from mrplip_core.train.pathflip import train_pathflip

    try:
        summary = train_pathflip(config, a.run_dir)
    except ValueError as exc:  # no usable slides, a config that cannot resume: one clear line
        print(f"mrplip pathflip: {exc}", file=sys.stderr)
        return 1
    if rank == 0:
        last = summary["history"][-1] if summary["history"] else {}
        print(json.dumps({k: v for k, v in summary.items() if k != "history"} | {"last": last}, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` verb to the ``mrplip`` command's subparsers."""
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
