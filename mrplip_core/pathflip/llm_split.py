"""The LLM sub-caption splitter (``pathflip.subcaptions.method: llm``), with the rules as its fallback.

PathFLIP has a language model rewrite a slide's report into region-level findings. Here each
slide's caption is sent to an OpenAI-compatible chat-completions server (a vLLM server the job
starts, or one the user runs: :mod:`mrplip_core.serving`), asking for JSON of one shape::

    {"findings": [{"text": "..."}, ...]}

With ``llm.structured_output`` the request carries that JSON schema as ``response_format``
(``{"type": "json_schema", ...}``, the OpenAI field; vLLM 0.32 turns it into a grammar that
constrains decoding, so even a weak model answers in the schema; vLLM's older ``guided_json``
field is silently ignored by that version). The answer is validated anyway:

- it parses as JSON (raw control characters inside strings allowed), holds a non-empty
  ``findings`` list, and every finding's ``text`` is non-empty and has at least ``min_words``
  words;
- a finding that is a verbatim substring of the caption gets its character span
  (``caption[start:end] == text``, searched after the previous finding first); one the model
  rephrased keeps ``start``/``end`` null: the table never claims a span the caption lacks.

A slide whose answer is invalid gets the rule-based sub-captions instead, marked ``method``
``rules-fallback`` with the reason in ``fallback_reason`` (:mod:`~mrplip_core.pathflip.subcaptions`).
A request that fails (an HTTP error after the retries, the server gone) is not model output:
no fallback, the slide is reported as an error (:class:`LLMRequestError`) and the job fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mrplip_core.pathflip.settings import LLMSplitSettings, SubcaptionSettings
from mrplip_core.pathflip.subcaptions import count_words, rows_table, subcaption_table
from mrplip_core.serving.client import ChatEndpoint, ChatReply, first_leaf

log = logging.getLogger(__name__)

#: Header that carries the slide id of a request (lets a proxy or server log count requests per slide).
SLIDE_HEADER = "X-Mrplip-Slide-Id"
#: The config section of the client settings, named in error messages.
WHERE = "pathflip.subcaptions.llm.openai"


class InvalidAnswer(ValueError):
    """The model's answer for a slide cannot be used (the message says why)."""


class LLMRequestError(RuntimeError):
    """The server gave no answer for some slides (the message names each slide and its error);
    ``tables`` holds the tables of the slides it did answer."""

    def __init__(self, message: str, tables: dict[str, pd.DataFrame]) -> None:
        super().__init__(message)
        self.tables = tables


@dataclass(frozen=True)
class Finding:
    """One finding of the model: ``caption[start:end] == text`` when both are set."""

    text: str
    start: int | None
    end: int | None


def findings_schema(max_findings: int, max_chars: int) -> dict:
    """The JSON schema of an answer: 1 to ``max_findings`` findings of 1 to ``max_chars`` characters."""
    finding = {"type": "object", "properties": {"text": {"type": "string", "minLength": 1, "maxLength": max_chars}},
               "required": ["text"], "additionalProperties": False}
    return {"type": "object", "properties": {"findings": {"type": "array", "items": finding, "minItems": 1,
                                                          "maxItems": max_findings}},
            "required": ["findings"], "additionalProperties": False}


def request_body(caption: str, llm: LLMSplitSettings, model: str) -> dict:
    """The chat-completions request of one slide (text only: the instruction, then the caption)."""
    body: dict = {
        "model": model,
        "messages": [{"role": "user", "content": f"{llm.prompt}\n\nReport:\n{caption}"}],
        "max_tokens": llm.max_tokens,
        "temperature": llm.temperature,
    }
    if llm.structured_output:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "findings", "schema": findings_schema(llm.max_findings, llm.max_finding_chars), "strict": True}}
    return body


def locate(caption: str, text: str, after: int = 0) -> tuple[int, int] | None:
    """The span of ``text`` in ``caption``: its first occurrence at or after ``after``, else its
    first occurrence anywhere; None when ``text`` is not a verbatim substring of the caption."""
    start = caption.find(text, after)
    if start < 0:
        start = caption.find(text)
    return None if start < 0 else (start, start + len(text))


def parse_findings(content: str, caption: str, *, min_words: int) -> list[Finding]:
    """The findings of one answer, each with its span in ``caption`` when it is verbatim.

    Raises :class:`InvalidAnswer` (the reason) when the answer is not JSON, holds no
    ``findings`` list, or a finding is not an object with a ``text`` of ``min_words`` words.
    """
    try:
        # strict=False: a raw control character inside a string is accepted (JSON wants it
        # escaped; xgrammar 0.2.8's schema grammar lets a model emit it raw, measured with vLLM 0.32)
        data = json.loads(content, strict=False)
    except ValueError as exc:
        raise InvalidAnswer(f"not JSON ({exc}): {content[:120]!r}") from None
    findings = data.get("findings") if isinstance(data, dict) else None
    if not isinstance(findings, list):
        raise InvalidAnswer(f"no 'findings' list in the answer: {content[:120]!r}")
    if not findings:
        raise InvalidAnswer("the answer lists no findings")
    out: list[Finding] = []
    after = 0
    for i, item in enumerate(findings):
        text = item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise InvalidAnswer(f"finding {i} has no 'text' string: {json.dumps(item)[:120]}")
        text = text.strip()
        if count_words(text) < min_words:
            raise InvalidAnswer(f"finding {i} has fewer than {min_words} word(s): {text[:120]!r}")
        span = locate(caption, text, after)
        if span:
            after = span[1]
        out.append(Finding(text, *(span or (None, None))))
    return out


def answer_table(slide_id: str, caption: str, reply: ChatReply, settings: SubcaptionSettings) -> pd.DataFrame:
    """One slide's sub-captions from the model's answer, or the rules' with the reason the answer
    was not used (``method`` ``rules-fallback``). ``reply`` must hold content (not an error)."""
    try:
        findings = parse_findings(reply.content or "", caption, min_words=settings.min_words)
    except InvalidAnswer as exc:
        reason = str(exc)
        if reply.finish_reason == "length":
            reason = f"answer cut at pathflip.subcaptions.llm.max_tokens ({settings.llm.max_tokens}): {reason}"
        return subcaption_table(slide_id, caption, split_clauses=settings.split_clauses, min_words=settings.min_words,
                                fallback_reason=reason)
    return rows_table(slide_id, [(f.text, f.start, f.end) for f in findings], "llm")


class LLMSplitter:
    """Sub-captions of many slides from one server (a context manager: it may start the server).

    ``split(captions)`` sends up to ``llm.openai.concurrency`` slides at a time and returns a
    table per slide; slides the server did not answer raise :class:`LLMRequestError` after
    every other slide is done (their tables are in the exception's ``tables``).
    """

    def __init__(self, settings: SubcaptionSettings, log_dir: str | Path | None = None) -> None:
        if settings.method != "llm":
            raise ValueError(f"pathflip.subcaptions.method is {settings.method!r}, not 'llm'")
        self.settings = settings
        self.endpoint = ChatEndpoint(settings.llm.openai, model=settings.llm.model, where=WHERE, log_dir=log_dir)

    @property
    def model(self) -> str:
        """The served model's name (known after ``__enter__``)."""
        return self.endpoint.model

    def __enter__(self) -> LLMSplitter:
        self.endpoint.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.endpoint.__exit__(*exc)

    def split(self, captions: Mapping[str, str]) -> dict[str, pd.DataFrame]:
        """``{slide_id: table}`` for every slide of ``captions`` (``{slide_id: caption}``)."""
        tables: dict[str, pd.DataFrame] = {}
        errors: dict[str, str] = {}
        try:
            asyncio.run(self._split(captions, tables, errors))
        except BaseExceptionGroup as group:  # from the TaskGroup: re-raise the cause itself
            raise first_leaf(group) from None
        if errors:
            raise LLMRequestError("; ".join(f"slide {sid}: {e}" for sid, e in sorted(errors.items())), tables)
        return tables

    async def _split(self, captions: Mapping[str, str], tables: dict[str, pd.DataFrame], errors: dict[str, str]) -> None:
        gate = asyncio.Semaphore(max(1, self.settings.llm.openai.concurrency))
        async with self.endpoint.session() as session:

            async def one(sid: str, caption: str) -> None:
                body = json.dumps(request_body(caption, self.settings.llm, self.model))
                async with gate:
                    reply = await self.endpoint.post(session, body, {SLIDE_HEADER: sid})
                if reply.error is not None:
                    errors[sid] = reply.error
                    return
                tables[sid] = answer_table(sid, caption, reply, self.settings)

            async with asyncio.TaskGroup() as tg:
                for sid, caption in captions.items():
                    tg.create_task(one(sid, caption))
