"""A feature-level planted-signal corpus for PathFLIP, in the exact artifact formats.

Each slide is a grid of patches (level-0 px coordinates, ``patch_px`` apart) divided into 2-3
regions; each region is one tissue kind, and a patch's feature is its kind's centroid plus
noise (and, with several magnifications, a per-magnification offset). The slide's caption
has one sentence per kind present, worded from a few templates, so the rule-based splitter
gives one sub-caption per kind and the ground-truth region of every sub-caption is known.

Written: ``slide_captions.parquet``, ``subcaptions/{slide}.parquet`` (the real splitter),
``features/{encoder}/{slide}.h5`` (groups per magnification with features, patch_ids, rows,
coords) and ``pathflip_truth.parquet`` (slide_id, patch_id, magnification, kind). The pixel-level
cohort of the benchmark goes through tiles and a real encoder instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from mrplip_core.encoders.catalog import DEFAULT_IMAGE_ENCODER
from mrplip_core.layout import Layout
from mrplip_core.pathflip.captions import COLUMNS as CAPTION_COLUMNS
from mrplip_core.pathflip.subcaptions import subcaption_table

STRING = h5py.string_dtype("utf-8")

KINDS: dict[str, tuple[str, ...]] = {
    "tumour": ("Sheets of tumour cells with large atypical nuclei are present.",
               "There is invasive carcinoma with crowded pleomorphic nuclei.",
               "A region of malignant epithelium shows frequent mitoses."),
    "stroma": ("Fibrous stroma with sparse spindle cells is seen.",
               "The stroma is collagen rich and paucicellular.",
               "Bands of desmoplastic stroma are present."),
    "lymphocytes": ("A dense lymphocytic infiltrate is present.",
                    "Aggregates of small round lymphocytes are seen.",
                    "There is a prominent immune infiltrate of lymphocytes."),
    "necrosis": ("An area of necrosis with eosinophilic debris is seen.",
                 "Geographic necrosis is present.",
                 "There is coagulative necrosis without viable cells."),
    "mucin": ("Pools of extracellular mucin are present.",
              "There is abundant pale mucin.",
              "Mucinous areas with floating cells are seen."),
}
TRUTH_FILE = "pathflip_truth.parquet"


def _regions(grid: int, n_kinds: int, rng: np.random.Generator) -> np.ndarray:
    """(grid, grid) region number of every patch: nearest of ``n_kinds`` random seeds."""
    seeds = rng.uniform(0, grid, size=(n_kinds, 2))
    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    d = (xx[..., None] - seeds[:, 0]) ** 2 + (yy[..., None] - seeds[:, 1]) ** 2
    return d.argmin(-1)


def write_pathflip_corpus(results: str | Path, *, n_slides: int = 12, grid: int = 8, dim: int = 32,
                          magnifications: Sequence[float] = (20.0,), noise: float = 0.6, seed: int = 0,
                          encoder: str = DEFAULT_IMAGE_ENCODER, patch_px: int = 512) -> Path:
    """Write the corpus under ``results``; returns it. Deterministic in ``seed``."""
    results = Path(results)
    layout = Layout(results)
    rng = np.random.default_rng(seed)
    names = list(KINDS)
    centroids = {k: rng.standard_normal(dim) * 1.5 for k in names}
    mag_offset = {m: rng.standard_normal(dim) * 0.5 for m in magnifications}
    captions, truth = [], []
    for s in range(n_slides):
        slide = f"planted_{s:03d}"
        kinds = [names[i] for i in rng.choice(len(names), size=int(rng.integers(2, 4)), replace=False)]
        regions = _regions(grid, len(kinds), rng)
        for r in range(len(kinds)):  # every drawn kind holds at least one patch
            if not (regions == r).any():
                regions.flat[int(rng.integers(regions.size))] = r
        caption = " ".join(KINDS[k][int(rng.integers(len(KINDS[k])))] for k in kinds)
        captions.append({"slide_id": slide, "caption": caption, "source": "table", "status": "ok", "reason": "",
                         "n_chars": len(caption)})
        subs = subcaption_table(slide, caption)
        layout.subcaptions(slide).parent.mkdir(parents=True, exist_ok=True)
        subs.to_parquet(layout.subcaptions(slide))
        path = layout.image_features(encoder, slide)
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.attrs.update(status="ok", slide_id=slide, format="mrplip.image_features/1", encoder=encoder)
            for m in magnifications:
                factor = max(1, int(round(m / magnifications[0])))  # finer grids at higher magnification
                g_n = grid * factor
                ys, xs = np.mgrid[0:g_n, 0:g_n]
                kind_idx = regions[ys // factor, xs // factor].reshape(-1)
                feats = np.stack([centroids[kinds[k]] for k in kind_idx]) + mag_offset[m] + noise * rng.standard_normal((g_n * g_n, dim))
                ids = [f"{slide}_{m:g}x_{i:05d}" for i in range(g_n * g_n)]
                step = patch_px // factor
                g = f.create_group(f"{m:g}x")
                g.create_dataset("features", data=feats.astype(np.float16))
                g.create_dataset("patch_ids", data=np.asarray(ids, dtype=object), dtype=STRING)
                g.create_dataset("rows", data=np.arange(g_n * g_n, dtype=np.int64))
                g.create_dataset("coords", data=np.stack([xs.reshape(-1) * step, ys.reshape(-1) * step], 1).astype(np.int64))
                g.attrs.update(magnification=float(m), n=g_n * g_n, size=step)
                truth += [{"slide_id": slide, "patch_id": pid, "magnification": float(m), "kind": kinds[k]}
                          for pid, k in zip(ids, kind_idx)]
    pd.DataFrame(captions, columns=CAPTION_COLUMNS).to_parquet(layout.slide_captions)
    pd.DataFrame(truth).to_parquet(results / TRUTH_FILE)
    return results


def subcaption_kind(text: str) -> str:
    """The kind a corpus sentence describes."""
    for kind, sentences in KINDS.items():
        if text in sentences:
            return kind
    raise KeyError(f"not a corpus sentence: {text!r}")


def tiny_pathflip_settings(results: str | Path, **sections: dict) -> dict:
    """A ``pathflip`` section with tiny dimensions over :func:`write_pathflip_corpus` (tests, CPU
    bench): a random 1-layer text encoder with the bundled MiniLM tokenizer. ``sections``
    update the named sections (``train={"steps": 10}``, ...)."""
    settings: dict = {
        "run": "tiny",
        "seed": 0,
        "data": {"results": str(results), "batch_size": 4, "patches_per_slide": 48, "subcaptions_per_slide": 3,
                 "max_caption_tokens": 64, "max_subcaption_tokens": 24, "val_fraction": 0.25},
        "model": {
            "text_encoder": "random",
            "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 64},
            "embed_dim": 32, "width": 32, "heads": 2, "latents": 4, "slide_layers": 1, "dropout": 0.0, "topk": 8,
        },
        "loss": {"region": {"init_bias": -2.0}},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "min_lr_ratio": 0.1},
        "train": {"steps": 20, "log_every": 1, "save_every": 1000, "threads": 1, "tensorboard": False},
    }
    for name, values in sections.items():
        settings[name] = {**settings.get(name, {}), **values} if isinstance(values, dict) else values
    return settings
