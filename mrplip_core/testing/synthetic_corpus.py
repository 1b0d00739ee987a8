"""Small synthetic corpora in the exact artifact formats, for tests and benchmarks.

Each patch gets a latent tissue class and one of two details of that class; its image
feature is the class centroid plus a detail offset plus a magnification offset plus
noise, its caption names class, detail and magnification in words the MiniLM tokenizer
knows, and the keywords of its bag are the classes (and details) its patches
show, embedded as fixed random vectors plus noise. Children inherit their parent's class
with probability ``inherit``. The data therefore has the structure every MR-PLIP term
can learn: image-caption agreement (ITC, ITM), predictable words (MLM, PLM), patch-keyword
agreement (CVTA) and parent-child agreement (MRTVA).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from mrplip_core.encoders.catalog import DEFAULT_IMAGE_ENCODER
from mrplip_core.layout import Layout
from mrplip_core.wsi.hierarchy import MANIFEST_COLUMNS

CLASSES: tuple[tuple[str, str, str], ...] = (
    ("tumor", "crowded atypical nuclei", "high grade"),
    ("stroma", "spindle cells in collagen", "loose fibers"),
    ("lymphocytes", "dense small round nuclei", "immune infiltrate"),
    ("necrosis", "pink debris without nuclei", "dead tissue"),
    ("mucus", "pale blue mucin pools", "few cells"),
    ("adipose", "large empty fat cells", "thin membranes"),
    ("muscle", "long eosinophilic fibers", "smooth muscle"),
    ("normal", "regular glands with goblet cells", "benign mucosa"),
)
STRING = h5py.string_dtype("utf-8")


def _vector(text: str, dim: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    v = rng.standard_normal(dim)
    return v / np.linalg.norm(v)


def write_synthetic_corpus(
    results: str | Path,
    *,
    slides: Sequence[tuple[str, float]] = (("synth_a", 40.0), ("synth_b", 20.0), ("synth_c", 40.0)),
    bags_per_slide: int = 4,
    magnifications: Sequence[float] = (5.0, 10.0, 20.0, 40.0),
    image_dim: int = 32,
    keyword_dim: int = 24,
    n_classes: int = 4,
    inherit: float = 0.8,
    noise: float = 0.3,
    failed_slide: bool = True,
    seed: int = 0,
    image_encoder: str = DEFAULT_IMAGE_ENCODER,
    text_encoder: str = "minilm",
    shuffle_feature_rows: bool = False,
    caption_sentences: int = 1,
) -> Path:
    """Write slides.parquet, tiles/, features/, text_features/, captions/, keywords/.

    Parameters
    ----------
    results: the results folder to create.
    slides: (slide_id, scan magnification) per slide; magnifications above the scan's are
        left out, as the tiler does.
    bags_per_slide: 5x parents per slide.
    image_dim, keyword_dim: feature widths.
    n_classes: tissue classes used (at most len(CLASSES)).
    failed_slide: also list a slide with status 'failed' and no files.
    shuffle_feature_rows: store feature rows in a random order (readers must locate rows
        by patch id, never by position).
    caption_sentences: sentences per caption (Quilt-LLaVA captions are 60-100 tokens;
        benchmarks use ~6 sentences to match).
    """
    results = Path(results)
    layout = Layout(results)
    rng = np.random.default_rng(seed)
    classes = CLASSES[:n_classes]
    centroids = {c[0]: _vector("image:" + c[0], image_dim) * 2.0 for c in classes}
    mag_offset = {m: _vector(f"mag:{m}", image_dim) * 0.5 for m in magnifications}
    variant_offset = {(c[0], v): 2.0 * _vector(f"variant:{c[0]}:{v}", image_dim) for c in classes for v in (0, 1)}
    records = []
    for slide_id, scan in slides:
        mags = [m for m in magnifications if m <= scan]
        rows, feats, captions, cls_of = [], {m: [] for m in mags}, [], {}
        for b in range(bags_per_slide):
            size0 = int(512 * (scan / mags[0]))
            bx, by = b * size0, 0
            root = f"{slide_id}_{mags[0]:g}x_x{bx}_y{by}"
            level = [(root, None, bx, by, size0, rng.integers(n_classes))]
            for depth, m in enumerate(mags):
                nxt = []
                for pid, parent, x, y, size, c in level:
                    rows.append(dict(slide_id=slide_id, patch_id=pid, parent_id=parent, bag_id=root,
                                     magnification=float(m), depth=depth, x=x, y=y, size=size, patch_px=512,
                                     mpp=10.0 / m, read_level=0, tissue_fraction=1.0))
                    name, detail, extra = classes[c]
                    variant = int(rng.integers(2))  # which detail the caption names; visible in the features
                    words = (detail, extra)[variant]
                    feature = centroids[name] + variant_offset[(name, variant)] + mag_offset[m]
                    feats[m].append((pid, feature + noise * rng.standard_normal(image_dim)))
                    text = f"{name} tissue showing {words}"
                    for k in range(1, caption_sentences):
                        text += f". at {m:g}x the {name} tissue shows {(detail, extra)[(variant + k) % 2]}"
                    captions.append((pid, text))
                    cls_of[pid] = (root, c)
                    if depth + 1 < len(mags):
                        half = size // 2
                        for dy in (0, half):
                            for dx in (0, half):
                                cc = c if rng.random() < inherit else rng.integers(n_classes)
                                nid = f"{slide_id}_{mags[depth + 1]:g}x_x{x + dx}_y{y + dy}"
                                nxt.append((nid, pid, x + dx, y + dy, half, cc))
                level = nxt
        manifest = pd.DataFrame(rows)[list(MANIFEST_COLUMNS)].astype(MANIFEST_COLUMNS)
        path = layout.tiles(slide_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest.to_parquet(path, index=False)

        path = layout.image_features(image_encoder, slide_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.attrs.update(status="ok", encoder=image_encoder, dim=image_dim, slide_id=slide_id)
            for m in mags:
                g = f.create_group(f"{m:g}x")
                order = rng.permutation(len(feats[m])) if shuffle_feature_rows else np.arange(len(feats[m]))
                g.create_dataset("features", data=np.stack([feats[m][i][1] for i in order]).astype(np.float16))
                g.create_dataset("patch_ids", data=np.asarray([feats[m][i][0] for i in order], dtype=object), dtype=STRING)
                g.attrs.update(magnification=float(m), encoder=image_encoder, dim=image_dim)

        cap = pd.DataFrame(captions, columns=["patch_id", "caption"])
        cap["prompt"], cap["model"], cap["backend"], cap["params"], cap["error"] = "describe", "synthetic", "synthetic", "{}", None
        path = layout.captions(slide_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        cap.to_parquet(path, index=False)

        kw_rows = []
        for root in manifest.loc[manifest["depth"] == 0, "patch_id"]:
            members = [(p, c) for p, (r, c) in cls_of.items() if r == root]
            present = sorted({c for _, c in members})
            for c in present:
                name, detail, extra = classes[c]
                pids = [p for p, cc in members if cc == c]
                for kw in (name, detail, extra):
                    kw_rows.append((root, kw, pids))
            for c in range(n_classes):  # classes absent from the bag still appear rarely
                if c not in present and rng.random() < 0.3:
                    kw_rows.append((root, classes[c][0], []))
        kw = pd.DataFrame(kw_rows, columns=["bag_id", "keyword", "patch_ids"])
        path = layout.keywords(slide_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        kw.to_parquet(path, index=False)

        path = layout.text_features(text_encoder, slide_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.attrs.update(status="ok", encoder=text_encoder, dim=keyword_dim, slide_id=slide_id)
            g = f.create_group("keywords")
            g.create_dataset("bag_id", data=kw["bag_id"].to_numpy(dtype=object), dtype=STRING)
            g.create_dataset("keyword", data=kw["keyword"].to_numpy(dtype=object), dtype=STRING)
            kf = np.stack([_vector("kw:" + k, keyword_dim) + 0.1 * rng.standard_normal(keyword_dim) for k in kw["keyword"]])
            g.create_dataset("features", data=kf.astype(np.float16))
            g = f.create_group("captions")
            g.create_dataset("patch_id", data=cap["patch_id"].to_numpy(dtype=object), dtype=STRING)
            g.create_dataset("features", data=np.zeros((len(cap), keyword_dim), dtype=np.float16))
        records.append(dict(slide_id=slide_id, path=f"{slide_id}.tiff", status="ok", error=None, mpp=10.0 / scan))
    if failed_slide:
        records.append(dict(slide_id="synth_failed", path="missing.tiff", status="failed", error="missing file", mpp=None))
    pd.DataFrame(records).to_parquet(layout.slides_table, index=False)
    return results


def write_synthetic_tokenizer(folder: str | Path) -> Path:
    """A WordPiece tokenizer whose vocabulary is the synthetic captions' words (~50 entries).

    Tests point ``pretrain.model.tokenizer`` here: a small vocabulary keeps the MLM/PLM
    output layers tiny. Real runs use the text encoder's own tokenizer.
    """
    from transformers import BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for c in CLASSES for text in c for w in text.split()} | {"tissue", "showing", "at"})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(str(folder))
    return folder


def tiny_pretrain_settings(results: str | Path, tokenizer: str | Path, **sections: dict) -> dict:
    """A ``pretrain`` section with tiny dimensions over a synthetic corpus (tests, CPU bench).

    ``sections`` update the named sections (``train={"steps": 10}``, ...).
    """
    settings: dict = {
        "run": "tiny",
        "seed": 0,
        "data": {"results": str(results), "batch_size": 4, "num_workers": 0, "val_fraction": 0.0, "max_keywords": 16,
                 "max_caption_tokens": 16},
        "model": {
            "text_encoder": "random",
            "tokenizer": str(tokenizer),
            "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 32},
            "embed_dim": 16, "fusion_layers": 1, "keyword_fusion_layers": 1, "decoder_layers": 1, "dropout": 0.0,
        },
        "optim": {"lr": 5e-3, "warmup_steps": 5, "min_lr_ratio": 1.0},
        "train": {"steps": 20, "log_every": 1, "save_every": 1000, "threads": 1, "tensorboard": False},
    }
    for name, values in sections.items():
        settings[name] = {**settings.get(name, {}), **values} if isinstance(values, dict) else values
    return settings
