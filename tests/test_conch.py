"""CONCH v1's image tower: the release's layout, strict loading from a whole CoCa checkpoint, output.

The real weights are gated, so the checkpoint is written by the test: random tensors under
the names and shapes that MahmoodLab/CONCH's code gives its CoCa model (``visual.*`` for the
image tower, the caption pooler included, plus text-tower keys), saved as the released
``pytorch_model.bin`` is, a pickled full-model state dict. The registry-wide checks (spec
complete, full-size output dim) run for ``conch`` in tests/test_encoders.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mrplip_core.encoders import get_spec, load_image_encoder
from mrplip_core.encoders.catalog import CONCH_CAPTION_POOLER_KEYS
from mrplip_core.encoders.spec import CLIP_MEAN, CLIP_STD
from mrplip_core.encoders.weights import WeightsError
from test_encoders import no_network, random_state_dict, sha256, skeleton  # noqa: F401  (autouse fixture)

#: The caption pooler as CONCH's code builds it: 256 queries of 768, 8 heads over 768-d tokens.
CAPTION_POOLER_SHAPES = dict(zip(CONCH_CAPTION_POOLER_KEYS, [
    (256, 768), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (768,), (768,), (768,), (768,),
]))
#: A few keys of the rest of the released model (text tower, temperature): not the image tower's.
OTHER_KEYS = {"text.positional_embedding": (128, 768), "text.cls_emb": (768,),
              "text.text_projection": (768, 512), "text.ln_final.weight": (768,), "logit_scale": ()}


def coca_checkpoint(tower_state: dict[str, torch.Tensor], *, caption_pooler: bool = True) -> dict[str, torch.Tensor]:
    """A whole-model state dict laid out as the release's: the tower under ``visual.``, its
    caption pooler beside it (when ``caption_pooler``), other towers' keys around it."""
    g = torch.Generator().manual_seed(5)
    extra = CAPTION_POOLER_SHAPES if caption_pooler else {}
    state = {f"visual.{k}": v for k, v in tower_state.items()}
    state.update({f"visual.{k}": torch.randn(s, generator=g) for k, s in extra.items()})
    state.update({k: torch.randn(s, generator=g) for k, s in OTHER_KEYS.items()})
    return state


def with_sharp_attention(tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tower`` with its pooler's LayerNorm gains at 1 and query/key projections whose outputs
    have std 2: with random_state_dict's small weights the query would attend almost uniformly,
    and a head that mixed up tokens, heads or projections would still give nearly the same output."""
    g = torch.Generator().manual_seed(11)
    p = "attn_pool_contrast."
    out = dict(tower)
    for key in ("ln_q.weight", "ln_k.weight"):
        out[p + key] = torch.ones_like(tower[p + key])
    for key, fan_in in (("attn.q_proj_weight", 512), ("attn.k_proj_weight", 768)):
        out[p + key] = torch.randn(tower[p + key].shape, generator=g) * 2 * fan_in**-0.5
    return out


def contrastive_head_by_hand(state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """CONCH's contrastive embedding from the trunk's tokens (B, L, 768), written out from its
    code without nn.MultiheadAttention: LayerNorm (eps 1e-5) of the tokens and of the single
    query, 8-head attention with separate q/k/v projections, output projection, LayerNorm,
    then ``x @ proj_contrast``."""
    p = "attn_pool_contrast."
    heads, dim = 8, 512
    context = F.layer_norm(tokens, (768,), state[p + "ln_k.weight"], state[p + "ln_k.bias"], eps=1e-5)
    query = F.layer_norm(state[p + "query"], (dim,), state[p + "ln_q.weight"], state[p + "ln_q.bias"], eps=1e-5)
    bias_q, bias_k, bias_v = state[p + "attn.in_proj_bias"].chunk(3)
    q = (query @ state[p + "attn.q_proj_weight"].T + bias_q).view(1, heads, dim // heads)
    k = (context @ state[p + "attn.k_proj_weight"].T + bias_k).unflatten(-1, (heads, dim // heads))
    v = (context @ state[p + "attn.v_proj_weight"].T + bias_v).unflatten(-1, (heads, dim // heads))
    weights = torch.einsum("qhd,blhd->bhql", q, k).div((dim // heads) ** 0.5).softmax(dim=-1)
    pooled = torch.einsum("bhql,blhd->bqhd", weights, v).flatten(2)[:, 0]
    pooled = pooled @ state[p + "attn.out_proj.weight"].T + state[p + "attn.out_proj.bias"]
    pooled = F.layer_norm(pooled, (dim,), state["ln_contrast.weight"], state["ln_contrast.bias"], eps=1e-5)
    return pooled @ state["proj_contrast"]


def test_conch_tower_has_the_layout_of_the_release() -> None:
    """Names and shapes of MahmoodLab/CONCH's VisualModel (timm ViT-B/16 trunk at 448 px, one
    512-d query over 768-d tokens, 512 x 512 projection); the caption pooler is not built."""
    model = skeleton("conch")
    state = model.state_dict()
    trunk = model.trunk
    assert trunk.patch_embed.patch_size == (16, 16) and len(trunk.blocks) == 12 and trunk.num_prefix_tokens == 1
    assert tuple(state["trunk.pos_embed"].shape) == (1, 1 + 28 * 28, 768)  # class token + 28 x 28 patches
    assert tuple(state["trunk.blocks.11.attn.qkv.weight"].shape) == (2304, 768) and trunk.norm.eps == 1e-6
    head = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("trunk.")}
    assert head == {
        "attn_pool_contrast.query": (1, 512),
        "attn_pool_contrast.attn.q_proj_weight": (512, 512),
        "attn_pool_contrast.attn.k_proj_weight": (512, 768),
        "attn_pool_contrast.attn.v_proj_weight": (512, 768),
        "attn_pool_contrast.attn.in_proj_bias": (1536,),
        "attn_pool_contrast.attn.out_proj.weight": (512, 512),
        "attn_pool_contrast.attn.out_proj.bias": (512,),
        "attn_pool_contrast.ln_q.weight": (512,),
        "attn_pool_contrast.ln_q.bias": (512,),
        "attn_pool_contrast.ln_k.weight": (768,),
        "attn_pool_contrast.ln_k.bias": (768,),
        "ln_contrast.weight": (512,),
        "ln_contrast.bias": (512,),
        "proj_contrast": (512, 512),
    }
    assert not any(k.startswith("trunk.head") or k.startswith("trunk.fc_norm") for k in state)  # num_classes=0
    assert sum(p.numel() for p in model.parameters()) == 87_829_248  # trunk 86,250,240 + head


def test_conch_loads_the_visual_keys_of_a_whole_coca_checkpoint_strictly(tmp_path) -> None:
    """Full size (87.8M parameters in the tower), fp32 as a pickled pytorch_model.bin; the
    embedding of 448 px input is (N, 512) and equals the head written out by hand."""
    tower = with_sharp_attention(random_state_dict("conch", torch.float32))
    path = tmp_path / "pytorch_model.bin"
    torch.save(coca_checkpoint(tower), path)

    enc = load_image_encoder("conch", path, allow_random_init=False)
    assert enc.weights.source == str(path) and enc.weights.sha256 == sha256(path) and enc.weights.dtype == "float32"
    assert (enc.dim, enc.input_px, enc.mean, enc.std) == (512, 448, CLIP_MEAN, CLIP_STD)
    attrs = enc.attrs()
    assert (attrs["input_px"], attrs["mean"], attrs["std"]) == (448, list(CLIP_MEAN), list(CLIP_STD))
    assert attrs["weights"] == str(path) and attrs["architecture"] == "conch_ViT-B-16" and attrs["dim"] == 512
    loaded = enc.module.state_dict()
    assert set(loaded) == set(tower)  # every tower key of the file, nothing else
    for key in ("trunk.pos_embed", "trunk.blocks.11.mlp.fc2.weight", "attn_pool_contrast.attn.k_proj_weight",
                "attn_pool_contrast.query", "proj_contrast"):
        assert torch.equal(loaded[key], tower[key]), key

    # A slide without patches records the same input and weights without building the model.
    from mrplip_core.features.image import _spec_attrs_without_model
    from mrplip_core.features.settings import FeatureSettings

    unbuilt = _spec_attrs_without_model(get_spec("conch"), FeatureSettings(weights={"conch": str(path)}))
    for key in ("input_px", "mean", "std", "weights", "weights_sha256", "encoder", "dim"):
        assert unbuilt[key] == attrs[key], key

    pixels = torch.randint(0, 256, (2, 448, 448, 3), dtype=torch.uint8)
    x = enc.normalize(pixels)
    seen = {}  # the trunk's final norm output and the pooler's input, from one forward pass
    hooks = [enc.module.trunk.norm.register_forward_hook(lambda mod, args, out: seen.update(norm=out)),
             enc.module.attn_pool_contrast.register_forward_hook(lambda mod, args, out: seen.update(pooler=args[0]))]
    with torch.inference_mode():
        out = enc.module(x)
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, 512) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the pooler reads every token after the trunk's final norm: the class token and 28 x 28 patches
    tokens = seen["pooler"]
    assert tokens.shape == (2, 785, 768) and torch.equal(tokens, seen["norm"])
    expected = contrastive_head_by_hand(loaded, tokens)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(out[0], out[1])


def test_conch_refuses_a_checkpoint_that_does_not_fit_naming_the_keys(tmp_path) -> None:
    """The registry's loader on CONCH's tower with one block (the layout is the same at full size)."""
    spec = get_spec("conch")
    small = replace(spec, arch_kwargs={**spec.arch_kwargs, "depth": 1})
    tower = random_state_dict(small, torch.float32)

    for name, state in {
        "whole.bin": coca_checkpoint(tower),
        "no_caption_pooler.bin": coca_checkpoint(tower, caption_pooler=False),  # dropped if absent, too
        "tower_alone.pth": dict(tower),  # the tower saved on its own, no prefix
    }.items():
        torch.save(state, tmp_path / name)
        enc = load_image_encoder(small, tmp_path / name, allow_random_init=False)
        assert torch.equal(enc.module.state_dict()["proj_contrast"], tower["proj_contrast"]), name

    bad = coca_checkpoint(tower)
    del bad["visual.attn_pool_contrast.ln_q.bias"]
    bad["visual.attn_pool_contrast.extra"] = torch.zeros(3)
    bad["visual.trunk.pos_embed"] = torch.zeros(1, 197, 768)  # a 224 px tower
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(WeightsError) as err:
        load_image_encoder(small, tmp_path / "bad.bin")
    msg = str(err.value)
    assert str(tmp_path / "bad.bin") in msg and "keys under 'visual.'" in msg
    assert "1 missing key(s): attn_pool_contrast.ln_q.bias" in msg
    assert "1 unexpected key(s): attn_pool_contrast.extra" in msg
    assert "trunk.pos_embed (checkpoint (1, 197, 768), model (1, 785, 768))" in msg

    torch.save(random_state_dict("tiny-vit-random", torch.float32), tmp_path / "other.bin")
    with pytest.raises(WeightsError, match="missing key.*attn_pool_contrast"):  # another model's weights
        load_image_encoder(small, tmp_path / "other.bin")


def test_conch_without_weights_is_random_init_or_an_error() -> None:
    with pytest.raises(WeightsError, match="features.weights.conch"):
        load_image_encoder("conch", allow_random_init=False)
    enc = load_image_encoder("conch")  # allowed: seeded, and every output says so
    attrs = enc.attrs()
    assert attrs["weights"] == "random-init" and attrs["weights_seed"] == 0
    assert (attrs["dim"], attrs["input_px"], attrs["mean"], attrs["std"]) == (512, 448, list(CLIP_MEAN), list(CLIP_STD))
