"""Zero-shot classification with prompt ensembles.

Each class is represented by the mean of the L2-normalised text embeddings of all its
prompts (synonyms x templates), normalised again; a tile is assigned the class whose
vector has the highest cosine similarity with its L2-normalised image embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mrplip_core.evaluation.embedders import ImageTextEmbedder
from mrplip_core.evaluation.prompts import PromptSet


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def class_embeddings(embedder: ImageTextEmbedder, prompts: PromptSet, classes: Sequence[str]) -> np.ndarray:
    """(C, D) unit vectors, one per class in ``classes`` order (one text batch for all prompts)."""
    prompts.check_labels(classes)
    texts: list[str] = []
    owner: list[int] = []
    for i, c in enumerate(classes):
        p = prompts.prompts(c)
        texts += p
        owner += [i] * len(p)
    emb = l2_normalize(embedder.embed_texts(texts))
    owner_arr = np.asarray(owner)
    means = np.stack([emb[owner_arr == i].mean(axis=0) for i in range(len(classes))])
    return l2_normalize(means)


def zero_shot_scores(image_embeddings: np.ndarray, class_vectors: np.ndarray) -> np.ndarray:
    """(N, C) cosine similarities of tiles to classes."""
    return l2_normalize(image_embeddings) @ np.asarray(class_vectors, dtype=np.float32).T


def zero_shot_predict(image_embeddings: np.ndarray, class_vectors: np.ndarray) -> np.ndarray:
    """(N,) index of the most similar class."""
    return zero_shot_scores(image_embeddings, class_vectors).argmax(axis=1)
