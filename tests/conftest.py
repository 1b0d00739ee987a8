"""Shared fixtures.

``shared_data`` finds the real slides and tiles in ``../shared/data`` beside the project
root. A user's fresh clone has no such folder, so tests that need it skip with a reason;
``.ci/run`` sets ``MRPLIP_REQUIRE_SHARED_DATA=1``, which turns that skip into a failure so
a wrong path cannot pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ``../shared/data`` (real slides and labelled tiles)."""
    if not (SHARED_DATA / "slides").is_dir():
        reason = f"real test data not found at {SHARED_DATA}"
        if os.environ.get("MRPLIP_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason + " and MRPLIP_REQUIRE_SHARED_DATA=1")
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


# A real vLLM server on CPU (slow tests): one per test session, shared by the captions tests
# (tests/test_captions_vllm.py) and the sub-captions splitter's (tests/test_subcaptions_llm.py).
@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    """The vLLM CPU venv (skips without one; see test_captions_support.require_vllm_venv)."""
    from test_captions_support import require_vllm_venv

    return require_vllm_venv()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A tiny random-weight LLaVA (HF folder), converted from the original release format."""
    from mrplip_core.testing.tiny_llava import build_tiny_hf

    return build_tiny_hf(tmp_path_factory.mktemp("model") / "tiny-quilt-llava")


@pytest.fixture(scope="session")
def vllm_server(vllm_venv, tiny_llava, tmp_path_factory):
    """`vllm serve` of ``tiny_llava``, started by the project's ManagedServer on 127.0.0.1."""
    from test_captions_support import serve_command, vllm_cpu_env

    from mrplip_core.serving.server import ManagedServer

    root = tmp_path_factory.mktemp("vllm")
    srv = ManagedServer(serve_command(vllm_venv), model=str(tiny_llava), env=vllm_cpu_env(root),
                        startup_timeout_s=900, log_path=root / "server.log")
    with srv:
        yield srv
