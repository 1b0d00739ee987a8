"""Start an OpenAI-compatible server (vLLM) for the duration of a job, and stop it.

:class:`ManagedServer` runs the configured command in its own process group, waits until
``GET /health`` answers 200 (or the start-up timeout passes, or the process exits), and on
leaving the ``with`` block, whatever happened, sends SIGTERM to the whole group and then
SIGKILL after a grace period. On Linux the server also gets SIGTERM if the job's process
itself dies (``PR_SET_PDEATHSIG``), so a killed job does not leave a GPU server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server could not be started (the message ends with the tail of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_argv(command: str, *, model: str, host: str, port: int) -> list[str]:
    """Split ``command`` like a shell and fill in ``{model}``, ``{name}``, ``{host}``, ``{port}``.

    ``{name}`` is the model directory's base name (a readable served-model name). Nothing
    else in the command is interpreted.
    """
    name = Path(model.rstrip("/")).name or model
    subs = {"{model}": model, "{name}": name, "{host}": host, "{port}": str(port)}
    out = []
    for word in shlex.split(command):
        for key, value in subs.items():
            word = word.replace(key, value)
        out.append(word)
    return out


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def health_ok(base: str, timeout: float = 2.0) -> bool:
    """True when ``GET {base}/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ManagedServer:
    """A server process started for one job.

    Parameters
    ----------
    command: command line (see :func:`server_argv`), e.g. ``vllm serve {model} --host {host} --port {port}``.
    model: value of ``{model}`` (a model directory).
    host / port: where it listens; port 0 picks a free one.
    env: extra environment variables.
    startup_timeout_s: how long to wait for ``/health``.
    log_path: the server's stdout and stderr (default: a file in the working directory).
    where: the config section of the server's settings, named in error messages
        (e.g. ``captions.openai.server``).
    """

    def __init__(
        self,
        command: str,
        *,
        model: str,
        host: str = "127.0.0.1",
        port: int = 0,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 1200.0,
        log_path: str | os.PathLike[str] | None = None,
        where: str = "server",
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.argv = server_argv(command, model=model, host=host, port=self.port)
        self.env = {**os.environ, **{k: str(v) for k, v in (env or {}).items()}}
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path or f"vllm-server-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self.where = where

    @property
    def base(self) -> str:
        """``http://host:port`` (no path)."""
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> str:
        """Start the server and wait until it is healthy; returns :attr:`base`."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting server: %s (log: %s)", shlex.join(self.argv), self.log_path)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as fh:
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise ServerError(f"cannot run {self.argv[0]!r}: {exc} ({self.where}.command)") from exc
        try:
            while True:
                if self.proc.poll() is not None:
                    raise ServerError(f"server exited with code {self.proc.returncode} while starting\n{self.log_tail()}")
                if health_ok(self.base):
                    break
                if time.monotonic() - t0 > self.startup_timeout_s:
                    raise ServerError(f"server not healthy after {self.startup_timeout_s:.0f} s "
                                      f"({self.where}.startup_timeout_s)\n{self.log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        log.info("server healthy at %s after %.1f s", self.base, self.startup_s)
        return self.base

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            log.info("stopping server (pid %d)", proc.pid)
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # the whole group: vLLM's engine processes too
            try:
                proc.wait(timeout=wait)
                if sig == signal.SIGTERM:
                    # the leader is gone; make sure no worker of the group survives it
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                break
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  | {line}" for line in lines[-n:])

    def __enter__(self) -> ManagedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
