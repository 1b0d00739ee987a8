"""PNG figures written like every other artifact: matplotlib (Agg backend), saved atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mrplip_core.io.atomic import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, out: str | Path) -> Path:
    """Write ``fig`` to ``out`` as PNG under a temporary name, then close it."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
    return Path(out)
