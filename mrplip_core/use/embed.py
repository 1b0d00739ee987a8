"""Embeddings of tiles, slides and texts with a trained model: ``mrplip embed``.

* Tiles (``--tiles FOLDER_OR_CSV``, MR-PLIP runs): each image is decoded as the evaluation
  stage decodes its tiles (:meth:`mrplip_core.evaluation.datasets.TileDataset.read`) and
  embedded by the evaluation stage's :class:`~mrplip_core.evaluation.embedders.MRPLIPEmbedder`:
  the run's frozen image encoder turns pixels into features, the MR-PLIP image side turns
  those into its embedding at ``10 / mpp`` x. The vectors are therefore the ones ``mrplip
  evaluate`` computes for the same tiles. A folder is read recursively (``.png .jpg .jpeg
  .tif .tiff .bmp``); a CSV has a ``path`` column (relative to the CSV's folder) and
  optionally ``mpp`` (um/px) per tile, else ``--mpp`` applies.
* Slides (``--slides ID ...``, PathFLIP runs): ``encode_slide`` over all of the slide's patch
  features at the model's magnifications (``results/features/{encoder}/{slide}.h5``).
* Texts (``--prompts FILE``, both families): one text per line (blank lines and lines starting
  with ``#`` skipped), or JSON: a list of strings, or an object of key -> string or list of
  strings (the key is kept per text).

The output file (``--out``, HDF5, readable with h5py alone)::

    /                  attrs: format "mrplip.embeddings/1", model ("{family}-{run}"), family,
                              run, run_dir, model_format, fingerprint (of the run's export),
                              steps, image_encoder, magnifications (x), settings (JSON of what
                              was asked), package versions
    /tiles/embeddings  (N, E) float32, L2-normalised, in input order (failed tiles left out)
    /tiles/paths       (N,) utf-8, the tile files
    /tiles/mpp         (N,) float64, um/px each tile was embedded at
    /tiles             attrs: source (folder or CSV), the frozen encoder's attrs (weights digest,
                              input px, mean/std, device, precision)
    /slides/embeddings (S, E) float32, L2-normalised
    /slides/slide_ids  (S,) utf-8
    /slides/n_patches  (S,) int64, patches pooled
    /texts/embeddings  (T, E) float32, L2-normalised
    /texts/texts       (T,) utf-8
    /texts/keys        (T,) utf-8, the JSON key of each text ("" for a plain list or lines)
    /failed/kind, /failed/item, /failed/error   (F,) utf-8: inputs that could not be embedded
                              (an unreadable tile, an unknown slide, a slide without features)

A group is present only when that input was given. Row ``i`` of ``embeddings`` belongs to
row ``i`` of the group's ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from mrplip_core.io.errors import machine_trouble
from mrplip_core.evaluation.datasets import IMAGE_SUFFIXES, DatasetError, TileDataset
from mrplip_core.features.h5 import STRING, package_versions, set_attrs, strings
from mrplip_core.io.atomic import atomic_path
from mrplip_core.layout import RESULTS
from mrplip_core.use.models import UsableModel
from mrplip_core.use.patches import SlideInputError, read_slide_patches

EMBED_FORMAT = "mrplip.embeddings/1"


class EmbedInputError(ValueError):
    """An input that ``mrplip embed`` cannot use as a whole (the message names it)."""


@dataclass
class Embeddings:
    """What one ``mrplip embed`` call computed; :func:`write_embeddings` stores it."""

    groups: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    group_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, item, error)


# -------------------------------------------------------------------------------------- inputs
def read_tile_list(source: str | Path, mpp: float | None) -> tuple[list[Path], list[float]]:
    """Tile files and their um/px: a folder (recursive, image suffixes) at ``mpp``, or a CSV
    with ``path`` and optionally ``mpp``. Raises :class:`EmbedInputError` naming the source,
    the CSV line, or the missing resolution."""
    src = Path(source).expanduser()
    if not src.exists():
        raise EmbedInputError(f"tiles {src}: does not exist")
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise EmbedInputError(f"tiles {src}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        if mpp is None:
            raise EmbedInputError(f"tiles {src}: give their resolution with --mpp (um/px)")
        return paths, [float(mpp)] * len(paths)
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    if "path" not in df.columns:
        raise EmbedInputError(f"tiles {src}: no 'path' column (has {list(df.columns)})")
    if df.empty:
        raise EmbedInputError(f"tiles {src}: no rows")
    paths, mpps = [], []
    for line, row in enumerate(df.to_dict("records"), start=2):
        if not row["path"]:
            raise EmbedInputError(f"tiles {src} line {line}: empty path")
        p = Path(row["path"]).expanduser()
        paths.append(p if p.is_absolute() else src.parent / p)
        value = row.get("mpp", "") or (None if mpp is None else str(mpp))
        try:
            tile_mpp = float(value) if value is not None else float("nan")
        except ValueError:
            raise EmbedInputError(f"tiles {src} line {line}: mpp {value!r} is not a number (um/px)") from None
        if not tile_mpp > 0:
            raise EmbedInputError(f"tiles {src} line {line}: no positive mpp (um/px): give an mpp column or --mpp")
        mpps.append(tile_mpp)
    return paths, mpps


def read_prompts(path: str | Path) -> tuple[list[str], list[str]]:
    """``(texts, keys)`` of a prompts file (lines, or JSON list / object); an empty text is an
    error naming the file and the line or key."""
    path = Path(path)
    if not path.is_file():
        raise EmbedInputError(f"prompts {path}: not a file")
    raw = path.read_text(encoding="utf-8")
    texts, keys = [], []
    if path.suffix.lower() == ".json":
        data = json.loads(raw)
        items = [("", v) for v in data] if isinstance(data, list) else list(data.items()) if isinstance(data, dict) else None
        if items is None:
            raise EmbedInputError(f"prompts {path}: JSON must be a list of strings or an object of key -> strings")
        for key, value in items:
            for text in [value] if isinstance(value, str) else list(value):
                if not isinstance(text, str) or not text.strip():
                    raise EmbedInputError(f"prompts {path}: an empty or non-string text{f' under {key!r}' if key else ''}")
                texts.append(text)
                keys.append(str(key))
    else:
        for line in raw.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                texts.append(line.strip())
                keys.append("")
    if not texts:
        raise EmbedInputError(f"prompts {path}: no text in the file")
    return texts, keys


# -------------------------------------------------------------------------------------- embedding
def tile_embedder(model: UsableModel, *, settings: dict[str, Any] | None = None, results: str | Path | None = None) -> Any:
    """The evaluation stage's :class:`MRPLIPEmbedder` of an MR-PLIP run (``settings``: the
    ``features`` section, for the frozen encoder's weights, and ``evaluation.embedding``)."""
    from mrplip_core.evaluation.embedders import MRPLIPEmbedder
    from mrplip_core.evaluation.settings import EmbeddingSettings
    from mrplip_core.features.settings import FeatureSettings

    if model.family != "mrplip":
        raise EmbedInputError(f"model {model.label}: PathFLIP embeds slides (--slides) and texts, not tiles; "
                              "use an MR-PLIP run for tile embeddings")
    s = settings or {}
    embedding = EmbeddingSettings(**((s.get("evaluation") or {}).get("embedding") or {"device": "cpu"}))
    return MRPLIPEmbedder.from_run(model.run_dir, features=FeatureSettings.from_dict(s.get("features")),
                                   embedding=embedding, results=results)


def embed_tiles(embedder: Any, paths: Sequence[Path], mpps: Sequence[float], out: Embeddings, *,
                source: str, batch_size: int = 64) -> None:
    """Embed tiles (``mpps``: um/px each) into ``out.groups["tiles"]``; an unreadable tile is
    recorded in ``out.failed`` with the reason naming it, the rest are embedded."""
    dataset = TileDataset("tiles", tuple(Path(p) for p in paths), ("",) * len(paths), 1.0, 10.0, source=str(source))
    good: list[int] = []
    images: dict[float, list[tuple[int, np.ndarray]]] = {}
    vectors: dict[int, np.ndarray] = {}

    def flush(mpp: float) -> None:
        batch = images.pop(mpp, [])
        if batch:
            emb = embedder.embed_images([im for _, im in batch], mpp)
            vectors.update({i: v for (i, _), v in zip(batch, emb)})

    for i in range(len(dataset)):
        try:
            image = dataset.read(i)
        except DatasetError as exc:
            out.failed.append(("tile", str(paths[i]), str(exc).replace("dataset 'tiles': ", "")))
            continue
        good.append(i)
        images.setdefault(float(mpps[i]), []).append((i, image))
        if len(images[float(mpps[i])]) >= batch_size:
            flush(float(mpps[i]))
    for mpp in list(images):
        flush(mpp)
    if not good:
        return
    out.groups["tiles"] = {"embeddings": np.stack([vectors[i] for i in good]).astype(np.float32),
                           "paths": strings([str(paths[i]) for i in good]),
                           "mpp": np.asarray([mpps[i] for i in good], dtype=np.float64)}
    encoder = embedder.frozen_encoder() if hasattr(embedder, "frozen_encoder") else None
    out.group_attrs["tiles"] = {"source": str(source), **(encoder.attrs() if encoder is not None else {})}


def embed_slides(model: UsableModel, slides: Sequence[str], out: Embeddings, results: str | Path = RESULTS) -> None:
    """PathFLIP slide embeddings (``encode_slide`` over every patch at the model's
    magnifications) into ``out.groups["slides"]``; a slide that cannot be used (unknown, no
    features) is recorded in ``out.failed`` naming it, the rest are embedded."""
    if model.family != "pathflip":
        raise EmbedInputError(f"model {model.label}: MR-PLIP has no slide encoder; use a PathFLIP run for --slides")
    ids, vectors, counts = [], [], []
    for slide in slides:
        try:
            patches = read_slide_patches(results, model.image_encoder, slide, model.magnifications)
            vectors.append(model.model.encode_slide(patches.features, patches.magnification).numpy())
        except (SlideInputError, ValueError, OSError) as exc:
            if machine_trouble(exc):  # a full disk or an I/O error fails the verb
                raise
            out.failed.append(("slide", slide, str(exc)))
            continue
        ids.append(slide)
        counts.append(len(patches))
    if ids:
        out.groups["slides"] = {"embeddings": np.stack(vectors).astype(np.float32), "slide_ids": strings(ids),
                                "n_patches": np.asarray(counts, dtype=np.int64)}
        out.group_attrs["slides"] = {"magnifications": list(model.magnifications)}


def embed_texts(model: UsableModel, texts: Sequence[str], keys: Sequence[str], out: Embeddings) -> None:
    """Text embeddings (``encode_text``) into ``out.groups["texts"]``."""
    emb = model.model.encode_text(list(texts))
    emb = emb.numpy() if hasattr(emb, "numpy") else np.asarray(emb)
    out.groups["texts"] = {"embeddings": emb.astype(np.float32), "texts": strings(texts), "keys": strings(keys)}


def write_embeddings(out: Embeddings, path: str | Path, model: UsableModel, settings: dict[str, Any]) -> Path:
    """Write ``out`` to ``path`` (HDF5, atomically) with the model's description in the root attrs."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        set_attrs(f, {**package_versions("transformers"), **model.describe(), "format": EMBED_FORMAT,
                      "settings": json.dumps(settings, sort_keys=True, default=str)})
        for name, data in out.groups.items():
            g = f.create_group(name)
            for key, value in data.items():
                if value.dtype == object:
                    g.create_dataset(key, data=value, dtype=STRING)
                else:
                    g.create_dataset(key, data=value)
            set_attrs(g, out.group_attrs.get(name, {}))
        if out.failed:
            g = f.create_group("failed")
            for j, key in enumerate(("kind", "item", "error")):
                g.create_dataset(key, data=strings([row[j] for row in out.failed]), dtype=STRING)
    return Path(path)
