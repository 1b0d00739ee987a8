"""Evaluation: zero-shot classification, linear and k-shot probes, cross-modal retrieval.

    from mrplip_core.evaluation import EvaluationSettings, TileDataset, build_embedder, evaluate_dataset

    settings = EvaluationSettings.from_dict(config["evaluation"])
    spec = settings.dataset("nct_crc")
    embedder = build_embedder("myrun")                 # or "frozen-uni" (the baseline)
    evaluate_dataset(embedder, TileDataset.load(spec), settings, "results/eval/myrun/nct_crc",
                     prompts=PromptSet.read(spec.prompts))

Embedders follow the :class:`ImageTextEmbedder` protocol (``embed_images(images, mpp)``,
``embed_texts(texts)``): :class:`MRPLIPEmbedder` (frozen encoder + pretrained MR-PLIP),
:class:`FrozenEncoderEmbedder` (baseline, no text side), and the known-answer embedders of
:mod:`mrplip_core.testing.known_answers`. Torch-using parts are imported on first use.
"""

from __future__ import annotations

from mrplip_core.evaluation.settings import DatasetSpec, EvaluationSettings
from mrplip_core.lazy import lazy_attributes

__all__ = [
    "DatasetSpec",
    "EvaluationSettings",
    "FeatureEmbedder",
    "FrozenEncoderEmbedder",
    "FrozenImageEncoder",
    "ImageTextEmbedder",
    "MRPLIPEmbedder",
    "PromptSet",
    "TileDataset",
    "build_embedder",
    "classification_metrics",
    "evaluate_dataset",
    "evaluate_retrieval",
    "few_shot",
    "linear_probe",
    "recall_at_k",
    "run_retrieval",
]

_LAZY = {
    "FeatureEmbedder": "mrplip_core.evaluation.embedders",
    "FrozenEncoderEmbedder": "mrplip_core.evaluation.embedders",
    "FrozenImageEncoder": "mrplip_core.evaluation.embedders",
    "ImageTextEmbedder": "mrplip_core.evaluation.embedders",
    "MRPLIPEmbedder": "mrplip_core.evaluation.embedders",
    "build_embedder": "mrplip_core.evaluation.embedders",
    "PromptSet": "mrplip_core.evaluation.prompts",
    "TileDataset": "mrplip_core.evaluation.datasets",
    "classification_metrics": "mrplip_core.evaluation.metrics",
    "recall_at_k": "mrplip_core.evaluation.metrics",
    "evaluate_dataset": "mrplip_core.evaluation.run",
    "run_retrieval": "mrplip_core.evaluation.run",
    "evaluate_retrieval": "mrplip_core.evaluation.retrieval",
    "few_shot": "mrplip_core.evaluation.probe",
    "linear_probe": "mrplip_core.evaluation.probe",
}


__getattr__ = lazy_attributes(__name__, _LAZY)
