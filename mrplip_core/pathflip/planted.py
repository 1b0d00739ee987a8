"""A planted-signal cohort for PathFLIP: synthetic slides whose captions' regions are known.

Each slide (``wsi/planted.py``) holds 2-3 tissue kinds of one palette (``tissue``: five kinds
that differ at every magnification; ``architecture``: glands or solid sheets crossed with low-
or high-grade nuclei) in smooth regions; its caption has one
sentence per kind, drawn from a few templates per kind (so a kind's sentence is not always the
same string), largest region first. The rule-based splitter (``pathflip/subcaptions.py``)
splits every caption into exactly those sentences (checked when the cohort is written), so
each sub-caption's ground-truth region is the region of its kind. ``mrplip planted-cohort``
writes, under one folder (a workflow working directory)::

    slides.tsv                 slide_id, path, mpp, site, caption, caption_source (generated),
                               regions (GeoJSON path), kinds (comma-separated)
    wsi/{slide}.tiff           the slides (pyramidal JPEG TIFF, level 0 at ``mpp`` um/px)
    regions/{slide}.geojson    each kind's region: polygons in level-0 px, property ``kind``
    truth.parquet              one row per caption sentence: its sub-caption id, char span
                               (start, end), text, kind, the region's area (mm^2, tissue share)
    config.yaml                the repository's config.yaml with ``slides: slides.tsv`` and a
                               small run (see :func:`config_overrides`)

Run the real pipeline on it with ``snakemake -s workflow/Snakefile -d DIR tiles features``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mrplip_core.io.atomic import write_parquet, write_text
from mrplip_core.pathflip.subcaptions import split_caption
from mrplip_core.wsi.magnification import base_magnification
from mrplip_core.wsi.planted import PALETTES, SCAN_MPP, plan_layout, write_planted_slide

#: Sentence templates per kind: each names its kind and describes what is painted. None holds
#: ", and", ", but", ", while", ", whereas" or ";", where the splitter would cut a clause.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "tumour": (
        "Invasive carcinoma forms solid sheets of tumour cells with large, crowded, hyperchromatic nuclei.",
        "A tumour area shows densely packed atypical cells with enlarged dark nuclei.",
        "Tumour cells with large irregular nuclei grow in cohesive sheets.",
        "There is a cellular tumour with crowded, enlarged and darkly staining nuclei.",
    ),
    "stroma": (
        "Fibrous stroma consists of pink collagen fibres with sparse spindle-shaped nuclei.",
        "A stromal area shows parallel eosinophilic collagen bundles with scattered elongated fibroblast nuclei.",
        "The stroma is collagenous and paucicellular with thin spindle cells between pink fibres.",
    ),
    "lymphocytes": (
        "A dense lymphocytic infiltrate of small round dark nuclei is present.",
        "Lymphocytes are packed in a sheet of small, round, uniformly dark nuclei.",
        "There is a lymphoid aggregate made of crowded small lymphocytes.",
    ),
    "necrosis": (
        "An area of necrosis shows pale eosinophilic debris without intact nuclei.",
        "Necrotic tissue is pale pink and granular with nuclear dust only.",
        "There is coagulative necrosis with structureless pale debris and no viable cells.",
    ),
    "mucin": (
        "Pools of pale bluish mucin contain clear vacuoles and rare floating cells.",
        "A mucinous area shows wispy pale blue-grey material with scattered vacuoles.",
        "Extracellular mucin forms pale lakes with a few vacuoles and almost no nuclei.",
    ),
    "glandular_low_grade": (
        "Well-formed round glands with open lumina are lined by small, uniform, round nuclei.",
        "Regular glands set in fibrous stroma have a single layer of bland epithelium with small nuclei.",
        "A gland-forming area shows open lumina lined by cells with small regular nuclei.",
    ),
    "glandular_high_grade": (
        "Round glands with open lumina are lined by cells with large, pleomorphic nuclei.",
        "Glands set in fibrous stroma are lined by atypical epithelium with enlarged irregular nuclei.",
        "A gland-forming area shows open lumina lined by cells with large variable nuclei.",
    ),
    "solid_low_grade": (
        "A solid sheet of cells without glands has small, uniform, round nuclei.",
        "Cells grow in solid nests without lumina and their nuclei are small and regular.",
        "There is a solid cellular area without gland formation with bland small nuclei.",
    ),
    "solid_high_grade": (
        "A solid sheet of cells without glands has large, pleomorphic nuclei.",
        "Cells grow in solid nests without lumina and their nuclei are enlarged and irregular.",
        "There is a solid cellular area without gland formation with large atypical nuclei.",
    ),
}

#: Keys of the repository's config.yaml that the cohort's config.yaml changes (nested keys
#: merge): the cohort's slide table, no demo slides, 5x/10x/20x tiles of every parent box at
#: least a quarter tissue (a planted slide holds a few boxes of 1 mm, and a region at its edge
#: needs patches too), a short pretraining run, no ablations and no tile sets to evaluate.
#: A cohort scanned at 40x adds 40x tiles and patches (:func:`config_overrides`).
CONFIG_OVERRIDES: dict[str, Any] = {
    "slides": "slides.tsv",
    "demo": [],
    "tiling": {"magnifications": [5, 10, 20], "selection": "all", "min_tissue_fraction": 0.25},
    "pretrain": {
        "run": "planted",
        "data": {"magnifications": [5, 10, 20], "patches_per_magnification": [1, 2, 2]},
        "train": {"steps": 20},
    },
    "ablations": {},
    "evaluation": {"datasets": {}},
}

#: The repository's config.yaml (the demo's), which the cohort's config starts from.
REPO_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


class CaptionSplitError(ValueError):
    """A generated caption does not split into exactly its kind sentences."""


@dataclass(frozen=True)
class CohortFiles:
    """Where a planted cohort's files live below its folder ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def table(self) -> Path:
        return self.root / "slides.tsv"

    @property
    def truth(self) -> Path:
        return self.root / "truth.parquet"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def slide(self, slide_id: str) -> Path:
        return self.root / "wsi" / f"{slide_id}.tiff"

    def regions(self, slide_id: str) -> Path:
        return self.root / "regions" / f"{slide_id}.geojson"


@dataclass(frozen=True)
class Sentence:
    """One sentence of a planted caption: ``caption[start:end] == text``, describing ``kind``."""

    kind: str
    text: str
    start: int
    end: int
    template: int  # index into TEMPLATES[kind]


def planted_caption(kinds: Sequence[str], rng: np.random.Generator) -> tuple[str, list[Sentence]]:
    """A caption of one sentence per kind, in the given order, each drawn from the kind's
    templates; returns the caption and its sentences (character spans)."""
    sentences: list[Sentence] = []
    start = 0
    for kind in kinds:
        t = int(rng.integers(len(TEMPLATES[kind])))
        text = TEMPLATES[kind][t]
        sentences.append(Sentence(kind, text, start, start + len(text), t))
        start += len(text) + 1
    return " ".join(s.text for s in sentences), sentences


def check_split(caption: str, sentences: Sequence[Sentence], **split_kw: Any) -> None:
    """Raise :class:`CaptionSplitError` unless ``split_caption`` gives exactly ``sentences``."""
    pieces = [(p.start, p.end) for p in split_caption(caption, **split_kw)]
    want = [(s.start, s.end) for s in sentences]
    if pieces != want:
        raise CaptionSplitError(f"caption {caption!r} splits into {pieces}, not the kind sentences {want}")


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and value and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_overrides(mpp: float) -> dict[str, Any]:
    """:data:`CONFIG_OVERRIDES` for a cohort scanned at ``mpp`` um/px: with 40x tiles and two
    40x patches per bag when the scan is 40x by the rule the tiles stage applies
    (``wsi.magnification.base_magnification``: 0.25 um/px and its tolerance band)."""
    if base_magnification(mpp) < 40.0:
        return copy.deepcopy(CONFIG_OVERRIDES)
    return _merge(CONFIG_OVERRIDES, {
        "tiling": {"magnifications": [5, 10, 20, 40]},
        "pretrain": {"data": {"magnifications": [5, 10, 20, 40], "patches_per_magnification": [1, 2, 2, 2]}},
    })


def cohort_config(base: Mapping[str, Any], overrides: Mapping[str, Any] = CONFIG_OVERRIDES) -> dict[str, Any]:
    """``base`` (a workflow config) with ``overrides`` merged in (nested mappings merge, a
    non-empty mapping or any other value replaces; an empty mapping replaces too)."""
    return _merge(dict(base), overrides)


def write_planted_cohort(
    out: str | Path,
    n_slides: int,
    seed: int = 0,
    *,
    size_mm: float = 4.1,
    mpp: float | None = None,
    kinds_per_slide: tuple[int, int] = (2, 3),
    palette: str = "tissue",
    base_config: str | Path = REPO_CONFIG,
) -> pd.DataFrame:
    """Write a planted cohort of ``n_slides`` slides of ``size_mm`` x ``size_mm`` (level 0 at
    ``mpp`` um/px; None: the palette's :data:`~mrplip_core.wsi.planted.SCAN_MPP`) into folder
    ``out``; return its truth table.

    The tiles stage lays its 5x parent boxes (512 px at 2 um/px: 1.024 mm) on a grid from the
    slide's corner, so a side just above a multiple of 1.024 mm wastes nothing: the default
    4.1 mm holds 4 x 4 boxes, 3.1 mm 3 x 3.

    ``palette`` names the kinds drawn from (``wsi.planted.PALETTES``: ``tissue`` or
    ``architecture``). Slide ``i`` is ``planted_{i:03d}``; its kinds (``kinds_per_slide``
    inclusive range), layout, pixels and caption are drawn from ``(seed, i)``, so a slide does
    not change when the cohort grows. Every file is written atomically; the same arguments give the same files.
    """
    if palette not in PALETTES:
        raise ValueError(f"palette must be one of {sorted(PALETTES)}, got {palette!r}")
    if mpp is None:
        mpp = SCAN_MPP[palette]
    files = CohortFiles(Path(out))
    side = int(round(size_mm * 1000.0 / mpp))
    rows, truth = [], []
    for i in range(n_slides):
        sid = f"planted_{i:03d}"
        rng = np.random.default_rng([seed, i])
        n_kinds = int(rng.integers(kinds_per_slide[0], kinds_per_slide[1] + 1))
        kinds = [str(k) for k in rng.choice(sorted(PALETTES[palette]), n_kinds, replace=False)]
        layout = plan_layout(side, side, mpp, kinds, rng)
        shares, areas = layout.shares(), layout.areas_mm2()
        order = sorted(kinds, key=lambda k: -shares[k])  # largest region first, as a report would
        caption, sentences = planted_caption(order, rng)
        check_split(caption, sentences)
        write_planted_slide(files.slide(sid), layout, seed=int(rng.integers(2**31)))
        write_text(json.dumps(layout.regions(sid), separators=(",", ":")), files.regions(sid))
        rows.append({"slide_id": sid, "path": str(files.slide(sid).relative_to(files.root)), "mpp": mpp,
                     "site": "planted", "caption": caption, "caption_source": "generated",
                     "regions": str(files.regions(sid).relative_to(files.root)), "kinds": ",".join(order)})
        truth += [{"slide_id": sid, "subcaption_id": f"{sid}_sc{j:03d}", "sentence": j, "kind": s.kind,
                   "text": s.text, "start": s.start, "end": s.end, "template": s.template,
                   "area_mm2": areas[s.kind], "tissue_share": shares[s.kind]} for j, s in enumerate(sentences)]
    write_text(pd.DataFrame(rows).to_csv(sep="\t", index=False), files.table)
    df = pd.DataFrame(truth, columns=["slide_id", "subcaption_id", "sentence", "kind", "text", "start", "end",
                                      "template", "area_mm2", "tissue_share"])
    df = df.astype({"slide_id": "string", "subcaption_id": "string", "sentence": "int64", "kind": "string",
                    "text": "string", "start": "int64", "end": "int64", "template": "int64",
                    "area_mm2": "float64", "tissue_share": "float64"})
    write_parquet(df, files.truth)
    base = yaml.safe_load(Path(base_config).read_text())
    overrides = config_overrides(mpp)
    header = (f"# Planted-signal cohort: {n_slides} slides ({palette} palette), seed {seed}, {size_mm} mm "
              f"at {mpp} um/px.\n"
              f"# Written by `mrplip planted-cohort` from {base_config} with these keys changed:\n"
              + "".join(f"#   {line}\n" for line in yaml.safe_dump(overrides, default_flow_style=True,
                                                                      width=10**6).splitlines())
              + "# Run: snakemake -s <repo>/workflow/Snakefile -d <this folder> tiles features\n")
    write_text(header + yaml.safe_dump(cohort_config(base, overrides), sort_keys=False, allow_unicode=True), files.config)
    return df
