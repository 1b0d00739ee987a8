"""A fake OpenAI-compatible chat-completions server (or counting proxy) in a background thread.

``FakeOpenAI`` listens on 127.0.0.1. On its own it answers with deterministic captions; given
``upstream`` it is a counting proxy in front of a real server (vLLM). Either way it records every
request (the ``X-Mrplip-Patch-Id`` header, or ``X-Mrplip-Slide-Id`` for the sub-captions
splitter), so a test can tell whether a patch was requested twice, and can inject faults: HTTP
errors for some patches, holding requests after the N-th, or dying (closing its socket) after
the N-th. ``answer`` scripts the reply to a request (text-only requests need it: the default
reply describes the request's image).

Used by ``tests/`` (``tests/test_captions_support.py`` re-exports it) and by the kill test
(:mod:`mrplip_core.testing.kill_workflow`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
from aiohttp import web

from mrplip_core.captions.openai_backend import PATCH_HEADER
from mrplip_core.pathflip.llm_split import SLIDE_HEADER

__all__ = ["FakeOpenAI", "free_port", "wait_for"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeOpenAI:
    """A chat-completions server (or counting proxy) in a thread; see the module docstring."""

    def __init__(self, upstream: str | None = None, port: int | None = None, model: str = "fake-llava",
                 delay_s: float = 0.0) -> None:
        self.upstream = upstream.rstrip("/") if upstream else None
        self.port = port or free_port()
        self.model = model
        self.delay_s = delay_s
        self.requests: list[str] = []  # patch ids, in arrival order (every attempt)
        self.answered: list[str] = []
        self.fail_status: dict[str, list[int]] = {}  # patch id -> statuses to answer, in turn
        self.answer: Callable[[str, dict], str] | None = None  # (request id, request body) -> reply content
        self.bodies: dict[str, dict] = {}  # request id -> its last request body (JSON)
        self.hold_after: int | None = None  # requests after this many are held (not answered)
        self.die_after: int | None = None  # after this many requests the server stops listening
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._release = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def counts(self) -> Counter:
        return Counter(self.requests)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeOpenAI:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._release = asyncio.Event()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(30)
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        if self.upstream:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._release.set()
            if self._session:
                await self._session.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop = None

    def release(self) -> None:
        """Let held requests go on."""
        self.hold_after = None
        if self._loop:
            self._loop.call_soon_threadsafe(self._release.set)

    # -- handlers --------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        if self.upstream:
            async with self._session.get(f"{self.upstream}/models") as r:
                return web.Response(body=await r.read(), status=r.status, content_type="application/json")
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        pid = request.headers.get(PATCH_HEADER) or request.headers.get(SLIDE_HEADER, "?")
        self.requests.append(pid)
        n = len(self.requests)
        if self.die_after is not None and n > self.die_after:
            asyncio.get_running_loop().create_task(self._runner.cleanup())  # stop listening
            request.transport.close()  # and drop this connection without an answer
            return web.Response(status=500)
        if self.hold_after is not None and n > self.hold_after:
            await self._release.wait()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            statuses = self.fail_status.get(pid)
            if statuses:
                status = statuses.pop(0)
                return web.json_response({"error": {"message": f"injected {status}"}}, status=status)
            body = await request.read()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.upstream:
                async with self._session.post(f"{self.upstream}/chat/completions", data=body,
                                              headers={"Content-Type": "application/json"}) as r:
                    data = await r.read()
                    self.answered.append(pid)
                    return web.Response(body=data, status=r.status, content_type="application/json")
            req = json.loads(body)
            self.bodies[pid] = req
            if self.answer is not None:
                caption = self.answer(pid, req)
            else:
                content = req["messages"][0]["content"]
                text = next(c["text"] for c in content if c["type"] == "text")
                url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
                caption = f"caption of {pid}: {len(url)} chars of image, prompt {text[:20]!r}"
            self.answered.append(pid)
            return web.json_response({"id": "x", "object": "chat.completion", "model": req["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": caption}}]})
        finally:
            self.in_flight -= 1


def wait_for(cond, timeout: float = 60.0, every: float = 0.05) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(every)
    return False
