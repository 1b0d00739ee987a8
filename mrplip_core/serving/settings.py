"""Settings of an OpenAI-compatible client and of the server a job starts (plain dataclasses).

Each stage that talks to a model server holds an :class:`OpenAIParams` under its own section
(``captions.openai``, ``pathflip.subcaptions.llm.openai``); the defaults equal those of
``workflow/schemas/config.schema.yaml`` (tests/test_config_defaults.py checks every section).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerParams:
    """A vLLM (or any OpenAI-compatible) server the job starts and stops itself."""

    # Command, split like a shell would (shlex); {model}, {name} (the model folder's name),
    # {host} and {port} are replaced (nothing else is interpreted: JSON needs no escaping).
    command: str = "vllm serve {model} --served-model-name {name} --host {host} --port {port}"
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    startup_timeout_s: float = 1200.0  # wait this long for GET /health to answer 200
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the server


@dataclass(frozen=True)
class OpenAIParams:
    """Client of an OpenAI-compatible chat-completions endpoint."""

    base_url: str | None = None  # e.g. http://gpu-node:8000/v1 (a server you run); None: start one
    model_name: str | None = None  # served model name; None: the only one /v1/models lists
    api_key_env: str | None = None  # environment variable holding the API key (None: no key)
    concurrency: int = 64  # requests in flight (keep the server's batch full)
    request_timeout_s: float = 600.0  # per request
    max_retries: int = 4  # retries of a transient failure (connection, timeout, 408/429/5xx)
    backoff_s: float = 1.0  # first retry delay; doubles each retry, with jitter
    abort_after_failures: int = 16  # consecutive connection failures: the server is gone, stop
    server: ServerParams = field(default_factory=ServerParams)
