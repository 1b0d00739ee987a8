"""Cross-modal retrieval on patch/caption pairs of slides held out from pretraining.

Pairs come from ``results/captions/{slide}.parquet`` (patches with a caption) joined with the
tile manifest (magnification, um/px). Images are embedded from the stored frozen features
(``results/features/{encoder}/{slide}.h5``) when the embedder starts from that encoder,
else from the patch pixels (``wsi.records.read_patch_image``).

Several patches may share one caption word for word (a templated captioner does this);
every patch with that caption then counts as a correct answer, in both directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from mrplip_core.evaluation.embedders import FeatureEmbedder, ImageTextEmbedder
from mrplip_core.evaluation.metrics import recall_at_k
from mrplip_core.evaluation.settings import RetrievalSettings
from mrplip_core.evaluation.zeroshot import l2_normalize
from mrplip_core.layout import Layout
from mrplip_core.wsi.magnification import format_magnification


def held_out_slides(run_dir: str | Path) -> list[str]:
    """Slides a run kept out of pretraining (its ``bag_index.parquet`` split "val")."""
    path = Path(run_dir) / "bag_index.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: cannot tell which slides the run held out")
    index = pd.read_parquet(path, columns=["slide_id", "split"])
    return sorted(index.loc[index["split"] == "val", "slide_id"].astype(str).unique())


def captioned_slides(results: str | Path) -> list[str]:
    """Slides with a captions file that are in the current cohort (``results/slides.parquet``,
    when present: captions of slides since removed from the slide table are left out)."""
    layout = Layout(results)
    every = layout.captions("*")  # the captions template with any slide
    found = sorted(p.stem for p in every.parent.glob(every.name))
    table = layout.slides_table
    if table.exists():
        cohort = set(pd.read_parquet(table, columns=["slide_id"])["slide_id"].astype(str))
        found = [s for s in found if s in cohort]
    return found


def retrieval_pairs(results: str | Path, slide_ids: Sequence[str], settings: RetrievalSettings) -> pd.DataFrame:
    """Patch/caption pairs of ``slide_ids``: slide_id, patch_id, caption, magnification, mpp.

    Patches without a caption (failed requests) are left out; at most ``max_pairs`` pairs
    are kept, drawn with ``seed``, in (slide, manifest) order. Each slide contributes at
    most twice its even share before the final draw, so memory stays bounded by
    ``max_pairs`` however many slides are held out.
    """
    layout = Layout(results)
    frames = []
    per_slide = max(1, -(-2 * settings.max_pairs // max(1, len(slide_ids))))
    for i, sid in enumerate(slide_ids):
        cap_path, man_path = layout.captions(sid), layout.tiles(sid)
        if not cap_path.exists() or not man_path.exists():
            continue
        cap = pd.read_parquet(cap_path, columns=["patch_id", "caption"])
        man = pd.read_parquet(man_path, columns=["patch_id", "magnification", "mpp"])
        df = man.merge(cap, on="patch_id", how="inner")
        df = df[df["caption"].notna() & (df["caption"].astype(str).str.strip() != "")]
        if settings.magnifications:
            df = df[np.isin(np.round(df["magnification"].to_numpy(float), 6), np.round(settings.magnifications, 6))]
        if len(df) > per_slide:
            keep = np.sort(np.random.default_rng([settings.seed, i]).choice(len(df), per_slide, replace=False))
            df = df.iloc[keep]
        df.insert(0, "slide_id", sid)
        frames.append(df)
    cols = ["slide_id", "patch_id", "caption", "magnification", "mpp"]
    pairs = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
    if len(pairs) > settings.max_pairs:
        keep = np.sort(np.random.default_rng(settings.seed).choice(len(pairs), settings.max_pairs, replace=False))
        pairs = pairs.iloc[keep].reset_index(drop=True)
    return pairs.reset_index(drop=True)


def embed_pair_images(embedder: ImageTextEmbedder, pairs: pd.DataFrame, results: str | Path) -> tuple[np.ndarray, str]:
    """Image embeddings of ``pairs`` (row order) and where they came from."""
    layout = Layout(results)
    out: np.ndarray | None = None
    encoder = getattr(embedder, "image_encoder", None)
    use_features = isinstance(embedder, FeatureEmbedder) and encoder and all(
        layout.image_features(encoder, s).exists() for s in pairs["slide_id"].unique())
    groups = pairs.groupby(["slide_id", "magnification"], sort=False)
    for (sid, mag), rows in groups:
        if use_features:
            feats = _stored_features(layout.image_features(encoder, sid), float(mag), rows["patch_id"].tolist())
            emb = embedder.embed_features(feats, 10.0 / float(mag))  # type: ignore[union-attr]
        else:
            from mrplip_core.wsi.records import read_patch_image

            images = [read_patch_image(layout, str(sid), pid) for pid in rows["patch_id"]]
            emb = embedder.embed_images(images, float(rows["mpp"].iloc[0]))
        if out is None:
            out = np.zeros((len(pairs), emb.shape[1]), dtype=np.float32)
        out[rows.index.to_numpy()] = emb
    source = f"stored features {Layout().pattern('image_features_dir', encoder=str(encoder))}/" if use_features else "patch pixels (read_patch_image)"
    return (out if out is not None else np.zeros((0, 0), np.float32)), source


def _stored_features(path: Path, magnification: float, patch_ids: list[str]) -> np.ndarray:
    with h5py.File(path, "r") as f:
        group = format_magnification(magnification)
        if group not in f:
            raise KeyError(f"{path}: no group {group!r} (groups {sorted(f)})")
        ids = list(f[group]["patch_ids"].asstr()[()])
        where = {p: i for i, p in enumerate(ids)}
        missing = [p for p in patch_ids if p not in where]
        if missing:
            raise KeyError(f"{path}: {len(missing)} captioned patches have no features, e.g. {missing[:3]}")
        rows = np.asarray([where[p] for p in patch_ids])
        order = np.argsort(rows)
        feats = np.empty((len(rows), f[group]["features"].shape[1]), dtype=np.float32)
        feats[order] = f[group]["features"][rows[order]]  # h5py needs increasing indices
        return feats


def retrieval_scores(image_emb: np.ndarray, text_emb: np.ndarray, captions: Sequence[str], ks: Sequence[int]) -> dict[str, Any]:
    """Recall@K both ways; pairs with the same caption text are all correct answers."""
    sim = l2_normalize(image_emb) @ l2_normalize(text_emb).T
    cap = np.asarray([str(c) for c in captions], dtype=object)
    correct = cap[:, None] == cap[None, :]
    n = len(cap)
    return {
        "n_pairs": int(n),
        "n_distinct_captions": int(len(set(cap.tolist()))),
        "image_to_text": recall_at_k(sim, ks, correct),
        "text_to_image": recall_at_k(sim.T, ks, correct.T),
        "chance": {f"R@{k}": float(np.mean(np.minimum(1.0, k * correct.sum(axis=1) / n))) for k in ks},
    }


def evaluate_retrieval(embedder: ImageTextEmbedder, results: str | Path, settings: RetrievalSettings,
                       run_dir: str | Path | None = None) -> dict[str, Any]:
    """Retrieval metrics of ``embedder`` (status "n/a" with the reason when it cannot run)."""
    if not embedder.has_text:
        return {"status": "n/a", "reason": f"{embedder.name} has no text side"}
    if settings.split == "val":
        if run_dir is None:
            return {"status": "n/a", "reason": "split 'val' needs the run folder (its held-out slides)"}
        slides = held_out_slides(run_dir)
        split_note = "slides held out from this run's pretraining (bag_index split 'val')"
        if not slides:
            return {"status": "n/a", "reason": "the run held out no slides (pretrain.data.val_fraction is 0 or the "
                    "cohort is too small); set evaluation.retrieval.split: all to measure on training slides"}
    else:
        slides = captioned_slides(results)
        split_note = "every captioned slide, INCLUDING the slides the model was pretrained on (not held out)"
    pairs = retrieval_pairs(results, slides, settings)
    if len(pairs) < 2:
        return {"status": "n/a", "reason": f"fewer than 2 captioned patches on {len(slides)} slide(s)"}
    image_emb, source = embed_pair_images(embedder, pairs, results)
    text_emb = embedder.embed_texts(pairs["caption"].tolist())
    overall = retrieval_scores(image_emb, text_emb, pairs["caption"].tolist(), settings.ks)
    by_mag = {}
    for mag, rows in pairs.groupby("magnification"):
        idx = rows.index.to_numpy()
        if len(idx) >= 2:
            scores = retrieval_scores(image_emb[idx], text_emb[idx], rows["caption"].tolist(), settings.ks)
            by_mag[format_magnification(float(mag))] = scores
    return {"status": "ok", "split": settings.split, "split_note": split_note, "slides": slides,
            "image_source": source, **overall, "by_magnification": by_mag}
