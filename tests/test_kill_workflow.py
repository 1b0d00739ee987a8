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


LOG = """Job stats:
job             count
------------  -------
all                 1
pathflip            1
features_slide      2
total               4

rule features_slide:
    output: results/features/e/a.h5
    jobid: 3
rule pathflip:
    output: results/pathflip/demo/model.safetensors
    jobid: 5
Finished jobid: 3 (Rule: features_slide)
"""


def test_a_kill_aims_at_stages_with_jobs_left_to_run(tmp_path):
    """The kill test's aim (fast, default suite): a stage counts as pending while a job of it runs
    or is planned and not started; a stage's first kill lands in the first half of its shortest
    reference job, so a job that runs faster than in the reference is still hit."""
    import random

    from mrplip_core.testing.kill_workflow import LogWatch, _kill_delay, _pending_stages

    log = tmp_path / "snakemake.log"
    log.write_text(LOG)
    watch = LogWatch(log, 0.0)
    watch.poll()
    assert watch.planned == {"all": 1, "pathflip": 1, "features_slide": 2}
    assert [j.rule for j in watch.running()] == ["pathflip"]
    assert _pending_stages(watch) == {"pathflip", "features"}  # one features job is still to start
    log.write_text(LOG + "rule features_slide:\n    output: results/features/e/b.h5\n    jobid: 4\n"
                   "Finished jobid: 4 (Rule: features_slide)\nFinished jobid: 5 (Rule: pathflip)\n")
    watch.poll()
    assert _pending_stages(watch) == set()
    lengths = {"pathflip": [10.0, 4.0, 12.0]}
    rng = random.Random(0)
    first = [_kill_delay("pathflip", lengths, True, rng) for _ in range(200)]
    later = [_kill_delay("pathflip", lengths, False, rng) for _ in range(200)]
    assert 0.2 <= min(first) and max(first) <= 2.0  # within half of the shortest job (4 s)
    assert max(later) > 4.0 and max(later) <= 10.0  # within the median job (10 s)
