"""The ``openai`` backend: captions from an OpenAI-compatible chat-completions server.

Built for throughput at scale:

- requests are sent with asyncio (aiohttp) and at most ``openai.concurrency`` in flight,
  enough to keep a vLLM server's continuous batch full;
- patches are read from the slide and PNG/JPEG-encoded in ``io_threads`` worker threads
  ahead of the requests (a bounded queue), so the server never waits for the client;
- transient failures (connection errors, timeouts, HTTP 408/429/5xx) are retried with
  exponential backoff and jitter; a request that still fails is emitted with its error;
- when the server is gone (the managed process exited, or ``abort_after_failures``
  consecutive connection failures) the run stops with :class:`ServerGone`; requests not
  answered are not recorded and are sent again by the next run.

The server is either one the user runs (``openai.base_url``) or started and stopped by
this backend (:class:`~mrplip_core.captions.server.ManagedServer`, ``openai.server``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp

from mrplip_core.captions.backends import CaptionResult, Emit, generation_params_json
from mrplip_core.captions.patches import PatchTask, SlideReader, data_url, encode_image, resize_for_model
from mrplip_core.captions.server import ManagedServer
from mrplip_core.captions.settings import CaptionSettings

log = logging.getLogger(__name__)

#: HTTP statuses worth retrying.
TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
#: Header that carries the patch id (lets a proxy or server log count requests per patch).
PATCH_HEADER = "X-Mrplip-Patch-Id"


class ServerGone(RuntimeError):
    """The server stopped answering; the run cannot go on (nothing unanswered is recorded)."""


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
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


def build_messages(prompt: str, image_url: str) -> list[dict]:
    """Chat messages of one request: the image, then the prompt (LLaVA-1.5 order)."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": prompt},
    ]}]


def list_models(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> list[str]:
    """Model ids served at ``base_url`` (``GET {base_url}/models``)."""
    req = urllib.request.Request(f"{base_url.rstrip('/')}/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return [m["id"] for m in json.load(r)["data"]]


class OpenAIBackend:
    """Captions through ``POST {base_url}/chat/completions``."""

    backend = "openai"

    def __init__(self, settings: CaptionSettings, log_dir: str | Path | None = None) -> None:
        self.settings = settings
        self.o = settings.openai
        self.api_key = os.environ.get(self.o.api_key_env) if self.o.api_key_env else None
        if self.o.api_key_env and not self.api_key:
            raise ValueError(f"captions.openai.api_key_env names {self.o.api_key_env!r}, which is not set")
        self.server: ManagedServer | None = None
        self.base_url = self.o.base_url.rstrip("/") if self.o.base_url else None
        self.model = self.o.model_name or settings.model or ""
        self.log_dir = Path(log_dir) if log_dir else Path(".")
        self.requests_sent = 0  # HTTP requests, retries included
        self.retries = 0
        self._conn_failures = 0

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> OpenAIBackend:
        if self.base_url is None:
            srv = self.o.server
            self.server = ManagedServer(
                srv.command, model=str(self.settings.model), host=srv.host, port=srv.port, env=srv.env,
                startup_timeout_s=srv.startup_timeout_s,
                log_path=self.log_dir / f"vllm-server-{os.getpid()}.log",
            )
            self.base_url = self.server.start() + "/v1"
        try:
            served = list_models(self.base_url, self.api_key)
            if self.o.model_name:
                if self.o.model_name not in served:
                    raise ValueError(f"captions.openai.model_name {self.o.model_name!r} is not served at "
                                     f"{self.base_url} (it serves {served})")
                self.model = self.o.model_name
            elif len(served) == 1:
                self.model = served[0]
            else:
                raise ValueError(f"{self.base_url} serves {served}: set captions.openai.model_name")
        except BaseException:
            self.__exit__()
            raise
        log.info("captioning with model %r at %s", self.model, self.base_url)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def params_json(self) -> str:
        return generation_params_json(self.settings)

    # -- captioning ------------------------------------------------------------------------
    def run(self, tasks: Iterable[PatchTask], reader: SlideReader, emit: Emit) -> None:
        try:
            asyncio.run(self._run(tasks, reader, emit))
        except BaseExceptionGroup as group:  # from the TaskGroup: re-raise the cause itself
            raise _first_leaf(group) from None

    def _prepare(self, reader: SlideReader, task: PatchTask) -> str:
        """Worker thread: read, resize, encode; returns the request body (JSON text)."""
        rgb = resize_for_model(reader.read(task), self.settings.image)
        data, mime = encode_image(rgb, self.settings.image)
        g = self.settings.generation
        body = {
            "model": self.model,
            "messages": build_messages(task.prompt, data_url(data, mime)),
            "max_tokens": g.max_tokens,
            "temperature": g.temperature,
            "top_p": g.top_p,
        }
        if g.temperature > 0:
            body["seed"] = g.seed
        return json.dumps(body)

    async def _run(self, tasks: Iterable[PatchTask], reader: SlideReader, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        n = max(1, self.o.concurrency)
        queue: asyncio.Queue = asyncio.Queue(maxsize=n + 2 * self.settings.io_threads)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        timeout = aiohttp.ClientTimeout(total=self.o.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=n, limit_per_host=n, force_close=False)
        with ThreadPoolExecutor(max(1, self.settings.io_threads), thread_name_prefix="encode") as pool:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:

                async def produce() -> None:
                    for task in tasks:
                        fut = loop.run_in_executor(pool, self._prepare, reader, task)
                        await queue.put((task, fut))
                    for _ in range(n):
                        await queue.put(None)

                async def work() -> None:
                    while (item := await queue.get()) is not None:
                        task, fut = item
                        try:
                            body = await fut
                        except Exception as exc:  # noqa: BLE001 - unreadable patch: recorded
                            emit(CaptionResult(task, None, f"reading patch: {type(exc).__name__}: {exc}"))
                            continue
                        caption, error = await self._request(session, task, body)
                        emit(CaptionResult(task, caption, error))

                async with asyncio.TaskGroup() as tg:
                    tg.create_task(produce())
                    for _ in range(n):
                        tg.create_task(work())

    async def _request(self, session: aiohttp.ClientSession, task: PatchTask, body: str) -> tuple[str | None, str | None]:
        """One patch: returns ``(caption, None)`` or ``(None, error)``; raises ServerGone.

        An error is returned (and recorded for the patch) for a non-transient HTTP status, a
        transient one (HTTP 5xx, 429, ...) still failing after ``max_retries`` retries, a body
        that is not chat-completions JSON, and an answer whose caption is empty or blank. A
        caption is kept whole, however long (the text encoders truncate to their own length).
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
                async with session.post(url, data=body, headers={PATCH_HEADER: task.patch_id}) as resp:
                    text = await resp.text()
                    self._conn_failures = 0
                    if resp.status in TRANSIENT_STATUS:
                        last = f"HTTP {resp.status}: {text[:300]}"
                        continue
                    if resp.status != 200:
                        return None, f"HTTP {resp.status}: {text[:500]}"
                    try:
                        choice = json.loads(text)["choices"][0]
                        content = choice["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        return None, f"malformed response ({type(exc).__name__}): {text[:300]}"
                    if not isinstance(content, str) or not content.strip():
                        return None, (f"empty caption {content!r} (finish_reason {choice.get('finish_reason')!r}): "
                                      f"{text[:300]}")
                    return content.strip(), None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._conn_failures += 1
                if self.server is not None and not self.server.alive():
                    raise ServerGone(f"the vLLM server exited (log: {self.server.log_path})\n{self.server.log_tail()}") from exc
                if self._conn_failures >= self.o.abort_after_failures:
                    raise ServerGone(f"{self._conn_failures} consecutive connection failures to {self.base_url} "
                                     f"(captions.openai.abort_after_failures); last: {last}") from exc
            except asyncio.TimeoutError:
                last = f"timeout after {self.o.request_timeout_s:.0f} s"
        return None, f"failed after {self.o.max_retries + 1} attempts: {last}"

