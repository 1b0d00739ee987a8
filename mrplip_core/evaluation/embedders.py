"""What evaluation embeds with: the small :class:`ImageTextEmbedder` protocol and its implementations.

* :class:`MRPLIPEmbedder`: a frozen image encoder followed by a pretrained MR-PLIP
  (``mrplip_core.model.load``): image and text embeddings in the ITC space. Zero-shot,
  linear probe and retrieval all apply.
* :class:`FrozenEncoderEmbedder`: the registry encoder's own features, before any
  pretraining: the baseline. No text side, so zero-shot and retrieval are n/a for it.
* Test embedders with known answers live in :mod:`mrplip_core.testing.known_answers`.

Both real embedders also implement :class:`FeatureEmbedder`: they can start from frozen
features already computed (``results/eval/features/{encoder}/{dataset}.h5`` for tiles,
``results/features/{encoder}/{slide}.h5`` for patches), so one tile-feature pass serves
every pretraining run and ablation that shares the encoder.

Units: ``mpp`` is the resolution (um/px) the images represent; an embedder that conditions
on magnification uses ``10 / mpp`` (x), which MR-PLIP snaps to its nearest pretraining
magnification on a log scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mrplip_core.evaluation.settings import BASELINE_PREFIX, EmbeddingSettings
from mrplip_core.layout import RESULTS, TEMPLATES, Layout
from mrplip_core.train.summary import RUN_CONFIG_FILE, read_run_config, run_summary
from mrplip_core.wsi.magnification import mpp_to_magnification


@runtime_checkable
class ImageTextEmbedder(Protocol):
    """Images and texts to vectors. ``has_text`` False: ``embed_texts`` raises."""

    name: str
    has_text: bool

    def embed_images(self, images: Sequence[np.ndarray], mpp: float) -> np.ndarray:
        """RGB uint8 images (any size) at ``mpp`` um/px -> float32 (N, D)."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 (N, D), in the same space as the images."""
        ...

    def describe(self) -> dict[str, Any]:
        """What this embedder is (recorded in every metrics.json)."""
        ...


@runtime_checkable
class FeatureEmbedder(ImageTextEmbedder, Protocol):
    """An embedder whose image side starts from a frozen registry encoder's features."""

    image_encoder: str  # registry name of the frozen encoder

    def embed_features(self, features: np.ndarray, mpp: float) -> np.ndarray:
        """Frozen-encoder features (N, D_enc) of images at ``mpp`` -> float32 (N, D)."""
        ...


class FrozenImageEncoder:
    """A registry image encoder run on RGB arrays, preprocessed as the features stage does.

    Each image is resized to the encoder's ``input_px`` with ``resize_patch`` (area when
    shrinking, cubic when enlarging), normalised with the encoder's mean/std on the
    device, and run under autocast (``precision``); the output is float32.
    """

    def __init__(self, encoder: Any, *, device: str = "auto", precision: str = "auto", batch_size: int = 128) -> None:
        from mrplip_core.encoders.runtime import resolve_device, resolve_precision

        self.encoder = encoder
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, encoder.spec, self.device)
        self.batch_size = int(batch_size)
        self.encoder.module.to(self.device).eval()

    @classmethod
    def load(cls, name: str, features: Any = None, embedding: EmbeddingSettings | None = None) -> FrozenImageEncoder:
        """Build ``name`` with the weights the features stage uses (``features``: FeatureSettings)."""
        from mrplip_core.encoders import get_spec
        from mrplip_core.encoders.image import load_image_encoder
        from mrplip_core.features.settings import FeatureSettings

        fs = features or FeatureSettings()
        spec = get_spec(name)
        enc = load_image_encoder(spec, fs.weights_for(spec.name, spec.weights_key), allow_random_init=fs.allow_random_init)
        e = embedding or EmbeddingSettings()
        return cls(enc, device=e.device, precision=e.precision, batch_size=e.batch_size)

    @property
    def name(self) -> str:
        return str(self.encoder.spec.name)

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def attrs(self) -> dict[str, Any]:
        return {**self.encoder.attrs(), "device": str(self.device), "precision": self.precision}

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        from mrplip_core.encoders.image import resize_patch
        from mrplip_core.encoders.runtime import autocast

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                batch = np.stack([resize_patch(np.ascontiguousarray(im[..., :3]), self.encoder.input_px) for im in chunk])
                x = self.encoder.normalize(torch.from_numpy(batch).to(self.device))
                with autocast(self.device, self.precision):
                    y = self.encoder.module(x)
                out[start : start + len(chunk)] = y.float().cpu().numpy()
        return out


class _Lazy:
    """An encoder, or a function building it on first use (not loaded when cached features suffice)."""

    def __init__(self, encoder: FrozenImageEncoder | Callable[[], FrozenImageEncoder]) -> None:
        built = isinstance(encoder, FrozenImageEncoder)
        self._factory = None if built else encoder
        self._value = encoder if built else None

    def get(self) -> FrozenImageEncoder:
        if self._value is None:
            self._value = self._factory()  # type: ignore[misc]
        return self._value


class FrozenEncoderEmbedder:
    """Baseline: the frozen encoder's own features (no pretraining, no text side)."""

    has_text = False

    def __init__(self, image_encoder: str, encoder: FrozenImageEncoder | Callable[[], FrozenImageEncoder]) -> None:
        self.image_encoder = image_encoder
        self.name = BASELINE_PREFIX + image_encoder
        self._encoder = _Lazy(encoder)

    def embed_features(self, features: np.ndarray, mpp: float) -> np.ndarray:
        return np.asarray(features, dtype=np.float32)

    def embed_images(self, images: Sequence[np.ndarray], mpp: float) -> np.ndarray:
        return self._encoder.get()(images)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError(f"{self.name}: a frozen image encoder has no text side (zero-shot and retrieval are n/a)")

    def describe(self) -> dict[str, Any]:
        return {"kind": "frozen-encoder", "name": self.name, "image_encoder": self.image_encoder, "text": None,
                "note": "the registry encoder's own features, before MR-PLIP pretraining"}


class MRPLIPEmbedder:
    """Frozen encoder + pretrained MR-PLIP heads (``mrplip_core.model.load``)."""

    has_text = True

    def __init__(self, model: Any, name: str, image_encoder: str,
                 encoder: FrozenImageEncoder | Callable[[], FrozenImageEncoder],
                 run_config: dict[str, Any] | None = None) -> None:
        self.model = model  # object with encode_image(features, magnification) and encode_text(texts)
        self.name = name
        self.image_encoder = image_encoder
        self.run_config = run_config or {}
        self._encoder = _Lazy(encoder)

    @classmethod
    def from_run(cls, run_dir: str | Path, *, features: Any = None, embedding: EmbeddingSettings | None = None,
                 results: str | Path | None = None) -> MRPLIPEmbedder:
        """Load ``results/pretrain/{run}``; the image encoder is the one the run was trained on.

        ``features`` (FeatureSettings) gives that encoder's weights; when the run's feature
        files record a weights digest, the loaded encoder must match it, so tiles are never
        embedded by different weights than the ones the heads were trained on.
        """
        from mrplip_core.encoders.runtime import resolve_device
        from mrplip_core.model import load

        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        data = config.get("data", {})
        encoder_name = str(data.get("image_encoder", ""))
        if not encoder_name:
            raise ValueError(f"{run_dir / RUN_CONFIG_FILE}: pretrain.data.image_encoder is not recorded")
        e = embedding or EmbeddingSettings()
        model = load(run_dir, device=resolve_device(e.device))
        if results is None:  # the results folder holding the run folder (the layout's pretrain/{run}: two levels up)
            results = run_dir
            for _ in Path(TEMPLATES["run_dir"]).parts:
                results = results.parent

        def encoder() -> FrozenImageEncoder:
            enc = FrozenImageEncoder.load(encoder_name, features, e)
            check_weights_match(Layout(results).image_features_dir(encoder_name), enc.encoder.weights.sha256,
                                encoder_name)
            return enc

        return cls(model, run_dir.name, encoder_name, encoder, config)

    def frozen_encoder(self) -> FrozenImageEncoder:
        """The frozen image encoder that turns tile pixels into features (built on first use)."""
        return self._encoder.get()

    def embed_features(self, features: np.ndarray, mpp: float) -> np.ndarray:
        out = self.model.encode_image(np.asarray(features, dtype=np.float32), magnification=mpp_to_magnification(mpp))
        return _numpy(out)

    def embed_images(self, images: Sequence[np.ndarray], mpp: float) -> np.ndarray:
        return self.embed_features(self._encoder.get()(images), mpp)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return _numpy(self.model.encode_text(list(texts)))

    def describe(self) -> dict[str, Any]:
        return {"kind": "mrplip", "name": self.name, "image_encoder": self.image_encoder,
                "text": "MR-PLIP text encoder", **run_summary(self.run_config)}


def check_weights_match(features_dir: Path, sha256: str, encoder: str) -> None:
    """Raise when the pretraining features of ``encoder`` were made with other weights."""
    import h5py

    for path in sorted(features_dir.glob("*.h5"))[:1]:
        with h5py.File(path, "r") as f:
            recorded = str(f.attrs.get("weights_sha256", ""))
        if recorded and not recorded.startswith("not computed") and recorded != sha256:
            raise ValueError(
                f"encoder {encoder!r}: the run's features ({path}) were made with weights sha256 {recorded[:12]}..., "
                f"but evaluation loaded weights {sha256[:12]}...; set features.weights.{encoder} to the same file"
            )


def build_embedder(model_id: str, *, results: str | Path = RESULTS, features: Any = None,
                   embedding: EmbeddingSettings | None = None) -> ImageTextEmbedder:
    """``frozen-{encoder}``: the baseline; anything else: the pretrain run of that name."""
    if model_id.startswith(BASELINE_PREFIX):
        name = model_id[len(BASELINE_PREFIX):]
        from mrplip_core.encoders import get_spec

        get_spec(name)  # unknown names fail here, listing the registered ones
        return FrozenEncoderEmbedder(name, lambda: FrozenImageEncoder.load(name, features, embedding))
    return MRPLIPEmbedder.from_run(Layout(results).run_dir(model_id), features=features, embedding=embedding,
                                   results=results)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
