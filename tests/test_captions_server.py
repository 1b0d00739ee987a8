"""ManagedServer: start a server command, wait for /health, always stop the whole group."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import pytest
from test_captions_support import wait_for

from mrplip_core.serving.server import ManagedServer, ServerError, server_argv

# A stand-in for `vllm serve`: becomes healthy after a delay, spawns a child (like vLLM's
# engine process) and writes both pids to a file.
FAKE = textwrap.dedent("""
    import http.server, os, subprocess, sys, time
    port, delay, pids = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(pids, "w").write(f"{os.getpid()} {child.pid}")
    if delay < 0:
        sys.exit(3)
    time.sleep(delay)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a):
            print("GET", self.path, flush=True)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE)
    return script, tmp_path / "pids"


def test_argv_fills_placeholders_only():
    argv = server_argv("vllm serve {model} --served-model-name {name} --port {port} "
                       "--limit-mm-per-prompt '{\"image\": 1}'", model="/m/quilt-llava/", host="h", port=5)
    assert argv == ["vllm", "serve", "/m/quilt-llava/", "--served-model-name", "quilt-llava", "--port", "5",
                    "--limit-mm-per-prompt", '{"image": 1}']


def test_waits_for_health_and_stops_the_process_group(fake, tmp_path):
    script, pids = fake
    srv = ManagedServer(f"{sys.executable} {script} {{port}} 1.0 {pids}", model="m", log_path=tmp_path / "s.log",
                        startup_timeout_s=60)
    with srv:
        assert srv.startup_s >= 1.0 and srv.alive()
        leader, child = map(int, pids.read_text().split())
        assert alive(child)
    assert wait_for(lambda: not alive(leader) and not alive(child), 15)
    assert "GET /health" in (tmp_path / "s.log").read_text()


def test_stops_even_when_the_job_fails(fake, tmp_path):
    script, pids = fake
    with pytest.raises(RuntimeError, match="boom"):
        with ManagedServer(f"{sys.executable} {script} {{port}} 0 {pids}", model="m", log_path=tmp_path / "s.log"):
            raise RuntimeError("boom")
    leader, child = map(int, pids.read_text().split())
    assert wait_for(lambda: not alive(leader) and not alive(child), 15)


def test_a_server_that_exits_or_never_gets_healthy_is_reported(fake, tmp_path):
    script, pids = fake
    with pytest.raises(ServerError, match="exited with code 3"):
        ManagedServer(f"{sys.executable} {script} {{port}} -1 {pids}", model="m", log_path=tmp_path / "a.log").start()
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="not healthy after 2 s"):
        ManagedServer(f"{sys.executable} {script} {{port}} 60 {pids}", model="m", log_path=tmp_path / "b.log",
                      startup_timeout_s=2).start()
    assert time.monotonic() - t0 < 30
    leader, child = map(int, pids.read_text().split())
    assert wait_for(lambda: not alive(leader) and not alive(child), 15)
    with pytest.raises(ServerError, match="cannot run"):
        ManagedServer("/nonexistent/vllm serve {model}", model="m", log_path=tmp_path / "c.log").start()


def test_sigterm_of_the_captions_job_stops_its_server(fake, tmp_path, repo_root):
    """A job cancelled by Snakemake/Slurm (SIGTERM) still stops the server it started."""
    import subprocess

    script, pids = fake
    runner = tmp_path / "job.py"
    runner.write_text(textwrap.dedent(f"""
        import time
        from mrplip_core.captions.run import _sigterm_as_exit
        from mrplip_core.serving.server import ManagedServer
        with _sigterm_as_exit():
            with ManagedServer({f"{sys.executable} {script} {{port}} 0 {pids}"!r}, model="m",
                               log_path={str(tmp_path / "s.log")!r}):
                print("up", flush=True)
                time.sleep(600)
    """))
    p = subprocess.Popen([sys.executable, str(runner)], cwd=repo_root, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up"
    leader, child = map(int, pids.read_text().split())
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 128 + signal.SIGTERM
    assert wait_for(lambda: not alive(leader) and not alive(child), 15)


def test_a_killed_job_does_not_leave_its_server_running(fake, tmp_path, repo_root):
    """SIGKILL cannot be caught: the server gets SIGTERM from the kernel (PR_SET_PDEATHSIG)."""
    import subprocess

    script, pids = fake
    runner = tmp_path / "job.py"
    runner.write_text(textwrap.dedent(f"""
        import time
        from mrplip_core.serving.server import ManagedServer
        with ManagedServer({f"{sys.executable} {script} {{port}} 0 {pids}"!r}, model="m",
                           log_path={str(tmp_path / "s.log")!r}):
            print("up", flush=True)
            time.sleep(600)
    """))
    p = subprocess.Popen([sys.executable, str(runner)], cwd=repo_root, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up"
    leader, child = map(int, pids.read_text().split())
    p.kill()
    p.wait(30)
    assert wait_for(lambda: not alive(leader), 15)
    os.kill(child, signal.SIGKILL)  # the stand-in's own child is not vLLM: clean it up here
