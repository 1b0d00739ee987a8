"""The default workflow SIGKILLed at random moments in every stage, rerun as the README says
(`snakemake --unlock`, then `--rerun-incomplete`), ends with the results of one clean run.

Slow (several minutes on 2 cores): `pytest -m slow -k killed_workflow`. The logic, and what is
run-specific and left out of the comparison: mrplip_core/testing/kill_workflow.py; the same
run with its figures printed: bench/kill_workflow.py.
"""

from __future__ import annotations

import pytest

from mrplip_core.testing.kill_workflow import STAGES, kill_test


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_workflow_reruns_to_the_clean_runs_results(tmp_path):
    f = kill_test(tmp_path, kills=10, seed=0)
    print({k: v for k, v in f.items() if k != "kill_log"})
    assert f["kills"] >= 10
    assert f["stages_hit"] == list(STAGES), f["kill_log"]
    assert f["artifacts_compared"] > 50
    assert f["mismatches"] == {} and f["missing"] == [] and f["extra"] == []
    assert f["temp_files"] == []
    assert f["survivors"] == 0, f["kill_log"]
    assert f["repeated_stored_caption_requests"] == 0
    assert f["finished_outputs_checked"] > 0 and f["finished_outputs_rewritten"] == []
    assert f["features_computed_twice"] == []
