"""Which trained model ``--model`` names, loaded, and its text-to-patch scores.

``--model`` is a run folder (``results/pathflip/demo``, ``results/pretrain/demo``, or a copy
elsewhere) or a run name looked up below the results folder (``pathflip/{run}``, then
``pretrain/{run}``). The family comes from the export's ``model.json`` ``format``:
``mrplip.pathflip/1`` is PathFLIP, ``mrplip.pretrained/1`` MR-PLIP.

Scores of a slide's patches for a text query (:meth:`UsableModel.patch_scores`):

* PathFLIP: the model's own localisation heatmap (``PretrainedPathFLIP.localize``): the
  text-conditioned pooling weights over the slide's patches; each query's row sums to 1.
* MR-PLIP (the baseline): the cosine of each patch's image embedding (``encode_image`` at the
  patch's magnification) with the text's embedding (``encode_text``), in [-1, 1]; no
  slide context.

Scores are comparable within a (slide, query), not across families.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrplip_core.layout import RESULTS, TEMPLATES, Layout
from mrplip_core.model.export import EXPORT_FORMAT as MRPLIP_FORMAT  # "mrplip.pretrained/1"
from mrplip_core.pathflip_model.export import EXPORT_FORMAT as PATHFLIP_FORMAT  # "mrplip.pathflip/1"

FAMILIES = {PATHFLIP_FORMAT: "pathflip", MRPLIP_FORMAT: "mrplip"}
MODEL_JSON = Path(TEMPLATES["model_json"]).name  # model.json, in both families' run folders
WEIGHTS = Path(TEMPLATES["model"]).name  # model.safetensors


class ModelError(ValueError):
    """``--model`` names no finished run of either family (the message says what was looked at)."""


def resolve_run_dir(model: str | Path, results: str | Path = RESULTS) -> Path:
    """The run folder of ``model``: itself when it is a folder holding ``model.json`` (relative to
    the working directory, or to ``results``: ``pathflip/demo``), else, for a
    name without a slash, ``results/pathflip/{model}`` or ``results/pretrain/{model}`` (an error
    when both hold a run)."""
    path = Path(model)
    if (path / MODEL_JSON).is_file():
        return path
    if not path.is_absolute() and (Path(results) / path / MODEL_JSON).is_file():  # pathflip/demo, pretrain/demo
        return Path(results) / path
    if len(path.parts) > 1:  # a path, not a run name
        raise ModelError(f"model {str(model)!r}: {path} holds no {MODEL_JSON} (not a run folder, or the run has not finished)")
    layout = Layout(results)
    found = [d for d in (layout.pathflip_dir(str(model)), layout.run_dir(str(model))) if (d / MODEL_JSON).is_file()]
    if not found:
        raise ModelError(f"model {str(model)!r}: not a run folder, and neither {layout.pathflip_dir(str(model))} nor "
                         f"{layout.run_dir(str(model))} holds a finished run ({MODEL_JSON})")
    if len(found) > 1:
        raise ModelError(f"model {str(model)!r}: both {found[0]} and {found[1]} hold a run; pass the run folder "
                         f"(or {Path(TEMPLATES['pathflip_dir']).parent}/{model}, {Path(TEMPLATES['run_dir']).parent}/{model})")
    return found[0]


def read_model_json(run_dir: str | Path) -> dict[str, Any]:
    """The export's ``model.json``; an unknown ``format`` is an error naming the file."""
    path = Path(run_dir) / MODEL_JSON
    meta = json.loads(path.read_text())
    if meta.get("format") not in FAMILIES:
        raise ModelError(f"{path}: format {meta.get('format')!r} is neither {PATHFLIP_FORMAT!r} (PathFLIP) "
                         f"nor {MRPLIP_FORMAT!r} (MR-PLIP)")
    if not (Path(run_dir) / WEIGHTS).is_file():
        raise ModelError(f"{Path(run_dir) / WEIGHTS} not found: the run has not finished")
    return meta


def model_family(run_dir: str | Path) -> str:
    """``pathflip`` or ``mrplip``, from the export's format."""
    return FAMILIES[read_model_json(run_dir)["format"]]


def model_label(run_dir: str | Path) -> str:
    """``{family}-{run}``: the ``{model}`` of the localisation outputs (``pathflip-demo``)."""
    return f"{model_family(run_dir)}-{Path(run_dir).name}"


@dataclass
class UsableModel:
    """A loaded export of either family and what the outputs record about it."""

    family: str  # pathflip | mrplip
    run_dir: Path
    meta: dict[str, Any]  # model.json
    model: Any  # PretrainedPathFLIP | PretrainedMRPLIP
    image_encoder: str  # registry name of the frozen encoder whose patch features it reads
    run_config: dict[str, Any]  # MR-PLIP: the run's resolved pretrain section; PathFLIP: {}

    @property
    def label(self) -> str:
        return f"{self.family}-{self.run_dir.name}"

    @property
    def magnifications(self) -> tuple[float, ...]:
        """Patch magnifications (x) the model was trained on."""
        return tuple(float(m) for m in self.model.magnifications)

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    def describe(self) -> dict[str, Any]:
        """What every output records about the model (HDF5 attrs, summary rows)."""
        return {"model": self.label, "family": self.family, "run": self.run_dir.name, "run_dir": str(self.run_dir),
                "model_format": str(self.meta.get("format")), "fingerprint": self.fingerprint,
                "steps": int(self.meta.get("steps", 0) or 0), "image_encoder": self.image_encoder,
                "magnifications": list(self.magnifications)}

    def patch_scores(self, features: np.ndarray, magnification: np.ndarray, queries: Sequence[str]) -> np.ndarray:
        """(Q, P) float32 scores of a slide's (P, D) patch features (``magnification``: (P,) x)
        for each query: PathFLIP's heatmap (rows sum to 1) or MR-PLIP's patch-text cosine."""
        check_queries(queries)
        if self.family == "pathflip":
            return self.model.localize(features, magnification, list(queries)).numpy().astype(np.float32)
        images = self.model.encode_image(np.asarray(features, dtype=np.float32), magnification)
        texts = self.model.encode_text(list(queries))
        return (texts @ images.T).numpy().astype(np.float32)


def check_queries(queries: Sequence[str]) -> None:
    """Refuse no query, or an empty or blank one, naming its position (1-based)."""
    if not len(queries):
        raise ValueError("no text query given (--text)")
    for i, q in enumerate(queries, start=1):
        if not str(q).strip():
            raise ValueError(f"text query {i} of {len(queries)} is empty")


def load_model(model: str | Path, results: str | Path = RESULTS, device: str = "cpu") -> UsableModel:
    """Load ``model`` (a run folder or name, see :func:`resolve_run_dir`) of either family."""
    run_dir = resolve_run_dir(model, results)
    meta = read_model_json(run_dir)
    if FAMILIES[meta["format"]] == "pathflip":
        from mrplip_core.pathflip_model import load_pathflip

        encoder = str(meta.get("image_encoder", ""))
        if not encoder:
            raise ModelError(f"{run_dir / MODEL_JSON}: the PathFLIP export does not record its image_encoder")
        return UsableModel("pathflip", run_dir, meta, load_pathflip(run_dir, device=device), encoder, {})
    from mrplip_core.model import load
    from mrplip_core.train.summary import RUN_CONFIG_FILE, read_run_config

    config = read_run_config(run_dir)
    encoder = str((config.get("data") or {}).get("image_encoder", ""))
    if not encoder:
        raise ModelError(f"{run_dir / RUN_CONFIG_FILE}: pretrain.data.image_encoder is not recorded")
    return UsableModel("mrplip", run_dir, meta, load(run_dir, device=device), encoder, config)
