"""What every report section reads: where the results are, where the page goes, its settings."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mrplip_core.evaluation.settings import DatasetSpec, ReportSettings
from mrplip_core.layout import Layout

IMAGES = "img"  # folder beside index.html holding every picture the page shows


@dataclass
class ReportContext:
    """Inputs of the report. Pictures are copied (and downscaled) into ``out/img`` so the
    folder opens from disk, or can be zipped and mailed, without the results tree."""

    results: Path  # the workflow's results folder
    out: Path  # the report folder (index.html and img/)
    settings: ReportSettings = field(default_factory=ReportSettings)
    eval_dir: Path | None = None  # default results/eval
    runs: list[str] | None = None  # pretrain runs to show; None: every folder under results/pretrain
    datasets: tuple[DatasetSpec, ...] = ()  # configured datasets (titles, citations); others on disk are not shown
    baselines: list[str] | None = None  # frozen encoders to show (registry names); None: every one on disk

    def __post_init__(self) -> None:
        self.results, self.out = Path(self.results), Path(self.out)
        self.eval_dir = Path(self.eval_dir) if self.eval_dir else self.layout.eval_dir
        (self.out / IMAGES).mkdir(parents=True, exist_ok=True)

    @property
    def layout(self) -> Layout:
        """Where the result files are (every path below ``results`` comes from it)."""
        return Layout(self.results)

    def image_path(self, name: str) -> Path:
        return self.out / IMAGES / name

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def copy_image(self, src: Path, name: str, max_width: int | None = None) -> str:
        """Copy ``src`` into img/ (downscaled to ``max_width`` px when wider); relative src for <img>."""
        dst = self.image_path(name)
        if max_width:
            with Image.open(src) as im:
                if im.width > max_width:
                    h = max(1, round(im.height * max_width / im.width))
                    im.convert("RGB").resize((max_width, h), Image.LANCZOS).save(dst)
                    return self.rel(dst)
        shutil.copyfile(src, dst)
        return self.rel(dst)

    def save_array(self, image: np.ndarray, name: str, side: int) -> str:
        """Save an RGB array downscaled to ``side`` px (JPEG when the name says so)."""
        dst = self.image_path(name)
        im = Image.fromarray(np.ascontiguousarray(image[..., :3]))
        if im.width != side:
            im = im.resize((side, max(1, round(im.height * side / im.width))), Image.LANCZOS)
        im.save(dst, quality=88) if dst.suffix.lower() in (".jpg", ".jpeg") else im.save(dst)
        return self.rel(dst)

    def run_dirs(self) -> list[Path]:
        """Pretrain run folders to show, in order."""
        if self.runs is not None:
            return [self.layout.run_dir(r) for r in self.runs]
        every = self.layout.run_dir("*")
        return sorted(p for p in every.parent.glob(every.name) if p.is_dir()) if every.parent.is_dir() else []
