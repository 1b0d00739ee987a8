"""The kill test as a benchmark: SIGKILL the default workflow N times, rerun, compare with a clean run.

    .venv/bin/python bench/kill_workflow.py --kills 12 --seed 0

Prints each kill (its target stage, the jobs it hit) and the figures: stages hit, artifacts
compared, mismatches, missing/extra files, temporary files left, surviving processes, caption
requests against the reference run, repeated requests for stored captions, finished outputs
written twice. What is compared and what counts as run-specific: mrplip_core/testing/kill_workflow.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mrplip_core.testing.kill_workflow import kill_test


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=12, help="SIGKILLs of the run (every stage once, then drawn)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill targets and moments")
    ap.add_argument("--workdir", type=Path, default=None, help="folder for the two workdirs (default: a temporary one)")
    a = ap.parse_args(argv)
    root = a.workdir or Path(tempfile.mkdtemp(prefix="mrplip-kill-"))
    print(f"workdirs in {root}", flush=True)
    figures = kill_test(root, kills=a.kills, seed=a.seed, log=lambda m: print(m, flush=True))
    print(json.dumps({k: v for k, v in figures.items() if k != "kill_log"}, indent=1))
    bad = (figures["mismatches"] or figures["missing"] or figures["extra"] or figures["temp_files"]
           or figures["survivors"] or figures["repeated_stored_caption_requests"] or figures["finished_outputs_rewritten"]
           or figures["stages_missed"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
