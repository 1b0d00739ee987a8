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
