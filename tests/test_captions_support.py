"""Helpers for the captioning tests (no tests here): slides to caption, the vLLM venv.

``FakeOpenAI`` (an OpenAI-compatible server or counting proxy in a thread), ``free_port`` and
``wait_for`` live in :mod:`mrplip_core.testing.fake_openai` and are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path

from mrplip_core.testing.fake_openai import FakeOpenAI, free_port, wait_for

__all__ = ["CMU", "FakeOpenAI", "free_port", "make_tiles", "require_vllm_venv", "serve_command", "vllm_cpu_env",
           "wait_for"]

CMU = "CMU-1-Small-Region.svs"


def make_tiles(shared_data: Path, out: Path, slide_id: str = "CMU1", slide_file: str = CMU, **tiling) -> Path:
    """Run the real tiles stage on a shared slide into ``out`` (results layout); returns ``out``.

    Default: CMU-1-Small-Region.svs (20x), 256 px patches at 5x/10x/20x, the 2 parents with
    the most tissue: 2 bags of 1 + 4 + 16 patches.
    """
    from mrplip_core.wsi.tiling import TilesOutputs, TilesSettings, tile_slide

    t = {"magnifications": [5, 10, 20], "patch_px": 256, "n_parents": 2, "selection": "most_tissue",
         "min_tissue_fraction": 0.3}
    t.update(tiling)
    settings = TilesSettings.from_dict({"tiling": t})
    path = shared_data / "slides" / slide_file
    outputs = TilesOutputs(out / "tiles" / f"{slide_id}.parquet", out / "tissue" / f"{slide_id}.geojson",
                           out / "tissue" / f"{slide_id}.png", out / "slides" / f"{slide_id}.json")
    rec = tile_slide(slide_id, str(path), outputs, settings)
    assert rec["status"] == "ok", rec
    return out


def vllm_cpu_env(root: Path) -> dict[str, str]:
    """Environment that vLLM's CPU backend needs here (see scripts/vllm-cpu-venv).

    TMPDIR is private (vLLM leaves IPC socket files there) and short: ZeroMQ IPC paths must
    fit in 107 characters, which pytest's tmp_path does not guarantee.
    """
    import tempfile

    tmp = tempfile.mkdtemp(prefix="mrplip-vllm-", dir="/tmp")
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CACHE_ROOT": str(root / "cache"),
        "TMPDIR": tmp, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }


def require_vllm_venv() -> Path:
    """The vLLM CPU venv (``MRPLIP_VLLM_VENV``, default ``.venv-vllm``); skips without it, unless
    ``MRPLIP_REQUIRE_VLLM=1``, which turns the skip into a failure."""
    import pytest

    venv = Path(os.environ.get("MRPLIP_VLLM_VENV", Path(__file__).resolve().parents[1] / ".venv-vllm"))
    if not (venv / "bin" / "vllm").exists():
        reason = f"no vLLM venv at {venv} (make it with scripts/vllm-cpu-venv {venv})"
        if os.environ.get("MRPLIP_REQUIRE_VLLM") == "1":
            pytest.fail(reason + " and MRPLIP_REQUIRE_VLLM=1")
        pytest.skip(reason)
    return venv


def serve_command(venv: Path) -> str:
    """`vllm serve` of the tests: --enforce-eager starts in about half the time on CPU; float32 to
    compare with transformers. Structured outputs (the sub-captions splitter's JSON schema) use
    xgrammar without free whitespace: with it, a random-weight model pads the JSON with blanks
    until max_tokens ("{" and 250 spaces, measured) instead of closing it."""
    return (f"{venv}/bin/vllm serve {{model}} --served-model-name {{name}} --host {{host}} --port {{port}}"
            " --max-model-len 512 --enforce-eager --dtype float32"
            " --structured-outputs-config.backend xgrammar --structured-outputs-config.disable_any_whitespace true")
