"""The ``openai`` backend: captions from an OpenAI-compatible chat-completions server.

Built for throughput at scale:

- requests are sent with asyncio (aiohttp) and at most ``openai.concurrency`` in flight,
  enough to keep a vLLM server's continuous batch full;
- patches are read from the slide and PNG/JPEG-encoded in ``io_threads`` worker threads
  ahead of the requests (a bounded queue), so the server never waits for the client;
- requests go through :class:`~mrplip_core.serving.client.ChatEndpoint`: transient failures
  (connection errors, timeouts, HTTP 408/429/5xx) are retried with exponential backoff and
  jitter, and a request that still fails is emitted with its error; when the server is gone
  the run stops with :class:`~mrplip_core.serving.client.ServerGone`; requests not answered
  are not recorded and are sent again by the next run.

The server is either one the user runs (``openai.base_url``) or started and stopped by
this backend (:class:`~mrplip_core.serving.server.ManagedServer`, ``openai.server``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mrplip_core.captions.backends import CaptionResult, Emit, generation_params_json
from mrplip_core.captions.patches import PatchTask, SlideReader, data_url, encode_image, resize_for_model
from mrplip_core.captions.settings import CaptionSettings
from mrplip_core.serving.client import ChatEndpoint, first_leaf

log = logging.getLogger(__name__)

#: Header that carries the patch id (lets a proxy or server log count requests per patch).
PATCH_HEADER = "X-Mrplip-Patch-Id"


def build_messages(prompt: str, image_url: str) -> list[dict]:
    """Chat messages of one request: the image, then the prompt (LLaVA-1.5 order)."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": prompt},
    ]}]


class OpenAIBackend:
    """Captions through ``POST {base_url}/chat/completions``."""

    backend = "openai"

    def __init__(self, settings: CaptionSettings, log_dir: str | Path | None = None) -> None:
        self.settings = settings
        self.o = settings.openai
        self.endpoint = ChatEndpoint(self.o, model=settings.model, where="captions.openai", log_dir=log_dir)

    @property
    def model(self) -> str:
        """The served model's name (known after ``__enter__``)."""
        return self.endpoint.model

    @model.setter
    def model(self, name: str) -> None:
        self.endpoint.model = name

    @property
    def requests_sent(self) -> int:
        """HTTP requests, retries included."""
        return self.endpoint.requests_sent

    @property
    def retries(self) -> int:
        return self.endpoint.retries

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> OpenAIBackend:
        self.endpoint.__enter__()
        log.info("captioning with model %r at %s", self.model, self.endpoint.base_url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.endpoint.__exit__(*exc)

    def params_json(self) -> str:
        return generation_params_json(self.settings)

    # -- captioning ------------------------------------------------------------------------
    def run(self, tasks: Iterable[PatchTask], reader: SlideReader, emit: Emit) -> None:
        try:
            asyncio.run(self._run(tasks, reader, emit))
        except BaseExceptionGroup as group:  # from the TaskGroup: re-raise the cause itself
            raise first_leaf(group) from None

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
        with ThreadPoolExecutor(max(1, self.settings.io_threads), thread_name_prefix="encode") as pool:
            async with self.endpoint.session() as session:

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
                        reply = await self.endpoint.post(session, body, {PATCH_HEADER: task.patch_id})
                        emit(CaptionResult(task, reply.content, reply.error))

                async with asyncio.TaskGroup() as tg:
                    tg.create_task(produce())
                    for _ in range(n):
                        tg.create_task(work())
