"""A torchrun worker dies with its launcher (mrplip_core.lifetime): no orphan trains on after a
job's process group is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# the launcher starts a worker in a session of its own (as torchrun does), prints its pid, waits
LAUNCHER = """
import subprocess, sys, time
env = dict(__import__("os").environ, LOCAL_RANK="0")
worker = subprocess.Popen([sys.executable, "-c", "import mrplip_core.lifetime as l, time; l.die_with_launcher(); time.sleep(60)"],
                          env=env, start_new_session=True)
print(worker.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_dies_with_its_launcher_killed_by_sigkill():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    time.sleep(1.0)  # the worker has set its death signal
    assert _alive(worker)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = not _alive(worker)
    if not gone:
        os.kill(worker, signal.SIGKILL)
    assert gone, "the worker outlived its launcher"


def test_outside_torchrun_nothing_is_set(monkeypatch):
    from mrplip_core.lifetime import die_with_launcher

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert die_with_launcher() is False
