"""A chat-completions endpoint: a server the job starts (or one the user runs), and its requests.

:class:`ChatEndpoint` is a context manager. On entry it starts a :class:`ManagedServer` when no
``base_url`` is configured, and resolves the model to ask from ``GET /v1/models``; on exit it
stops the server it started. :meth:`ChatEndpoint.post` sends one request body:

- transient failures (connection errors, timeouts, HTTP 408/429/5xx) are retried with
  exponential backoff and jitter; a request that still fails is returned with its error;
- when the server is gone (the managed process exited, or ``abort_after_failures``
  consecutive connection failures) it raises :class:`ServerGone`.

What goes into a body (messages, images, a response schema) is the caller's business.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from mrplip_core.serving.server import ManagedServer
from mrplip_core.serving.settings import OpenAIParams

log = logging.getLogger(__name__)

#: HTTP statuses worth retrying.
TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ServerGone(RuntimeError):
    """The server stopped answering; the run cannot go on."""


@dataclass(frozen=True)
class ChatReply:
    """The outcome of one request: ``content`` (the first choice's message) or ``error``."""

    content: str | None
    error: str | None = None
    finish_reason: str | None = None


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first ServerGone in a (nested) exception group, else its first leaf exception."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    return next((e for e in leaves if isinstance(e, ServerGone)), leaves[0])


def list_models(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> list[str]:
    """Model ids served at ``base_url`` (``GET {base_url}/models``)."""
    req = urllib.request.Request(f"{base_url.rstrip('/')}/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return [m["id"] for m in json.load(r)["data"]]


class ChatEndpoint:
    """``POST {base_url}/chat/completions`` of a configured or managed server.

    Parameters
    ----------
    params: the client settings (``<section>.openai``).
    model: the model folder a managed server is started on (``{model}`` of the server command);
        also the model name asked for when nothing else names one.
    where: the config section of ``params`` (``captions.openai``), named in error messages.
    log_dir: folder of the managed server's log (``vllm-server-<pid>.log``).
    """

    def __init__(self, params: OpenAIParams, *, model: str | None, where: str,
                 log_dir: str | Path | None = None) -> None:
        self.o = params
        self.where = where
        self.model_path = model
        self.api_key = os.environ.get(params.api_key_env) if params.api_key_env else None
        if params.api_key_env and not self.api_key:
            raise ValueError(f"{where}.api_key_env names {params.api_key_env!r}, which is not set")
        self.server: ManagedServer | None = None
        self.base_url = params.base_url.rstrip("/") if params.base_url else None
        self.model = params.model_name or model or ""
        self.log_dir = Path(log_dir) if log_dir else Path(".")
        self.requests_sent = 0  # HTTP requests, retries included
        self.retries = 0
        self._conn_failures = 0

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> ChatEndpoint:
        if self.base_url is None:
            if not self.model_path:
                raise ValueError(f"{self.where}: no base_url and no model folder to start a server on")
            srv = self.o.server
            self.server = ManagedServer(
                srv.command, model=str(self.model_path), host=srv.host, port=srv.port, env=srv.env,
                startup_timeout_s=srv.startup_timeout_s, log_path=self.log_dir / f"vllm-server-{os.getpid()}.log",
                where=f"{self.where}.server",
            )
            self.base_url = self.server.start() + "/v1"
        try:
            served = list_models(self.base_url, self.api_key)
            if self.o.model_name:
                if self.o.model_name not in served:
                    raise ValueError(f"{self.where}.model_name {self.o.model_name!r} is not served at "
                                     f"{self.base_url} (it serves {served})")
                self.model = self.o.model_name
            elif len(served) == 1:
                self.model = served[0]
            else:
                raise ValueError(f"{self.base_url} serves {served}: set {self.where}.model_name")
        except BaseException:
            self.__exit__()
            raise
        log.info("using model %r at %s", self.model, self.base_url)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
            if self.o.base_url is None:
                self.base_url = None

    # -- requests --------------------------------------------------------------------------
    def session(self) -> aiohttp.ClientSession:
        """A client session sized for ``concurrency`` requests in flight (use inside a loop)."""
        n = max(1, self.o.concurrency)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        timeout = aiohttp.ClientTimeout(total=self.o.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=n, limit_per_host=n, force_close=False)
        return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)

    async def post(self, session: aiohttp.ClientSession, body: str, headers: dict[str, str] | None = None) -> ChatReply:
        """Send one chat-completions body (JSON text); returns the reply or its error.

        An error is returned for a non-transient HTTP status, a transient one (5xx, 429, ...)
        still failing after ``max_retries`` retries, a body that is not chat-completions JSON,
        and an empty or blank answer. Raises :class:`ServerGone` when the server exited or
        stopped accepting connections.
        """
        url = f"{self.base_url}/chat/completions"
        last = ""
        for attempt in range(self.o.max_retries + 1):
            if attempt:
                self.retries += 1
                delay = min(60.0, self.o.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                await asyncio.sleep(delay)
            self.requests_sent += 1
            try:
                async with session.post(url, data=body, headers=headers or {}) as resp:
                    text = await resp.text()
                    self._conn_failures = 0
                    if resp.status in TRANSIENT_STATUS:
                        last = f"HTTP {resp.status}: {text[:300]}"
                        continue
                    if resp.status != 200:
                        return ChatReply(None, f"HTTP {resp.status}: {text[:500]}")
                    try:
                        choice = json.loads(text)["choices"][0]
                        content = choice["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        return ChatReply(None, f"malformed response ({type(exc).__name__}): {text[:300]}")
                    reason = choice.get("finish_reason")
                    if not isinstance(content, str) or not content.strip():  # recorded, so a rerun asks again
                        return ChatReply(None, f"empty answer {content!r} (finish_reason {reason!r}): {text[:300]}", reason)
                    return ChatReply(content.strip(), None, reason)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._conn_failures += 1
                if self.server is not None and not self.server.alive():
                    raise ServerGone(f"the vLLM server exited (log: {self.server.log_path})\n{self.server.log_tail()}") from exc
                if self._conn_failures >= self.o.abort_after_failures:
                    raise ServerGone(f"{self._conn_failures} consecutive connection failures to {self.base_url} "
                                     f"({self.where}.abort_after_failures); last: {last}") from exc
            except asyncio.TimeoutError:
                last = f"timeout after {self.o.request_timeout_s:.0f} s"
        return ChatReply(None, f"failed after {self.o.max_retries + 1} attempts: {last}")
