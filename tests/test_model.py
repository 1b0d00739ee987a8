"""The MR-PLIP model: modules per active term, masks (padding, prefix LM), the objective's
compact MLM/PLM logits, and the export/load API used by evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mrplip_core.data.lm_inputs import IGNORE_INDEX, make_prefix_lm_batch, mask_tokens
from mrplip_core.losses import MRPLIPLoss
from mrplip_core.model import (
    ALL_HEADS,
    ModelDims,
    ModelSettings,
    MRPLIPModel,
    build_text_encoder,
    load,
    load_tokenizer,
    save_export,
)
from mrplip_core.model.export import TOKENIZER, magnification_levels
from mrplip_core.train.objective import MRPLIPObjective, duplicate_pairs

TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
DIMS = ModelDims(image_dim=12, keyword_dim=10, magnifications=(5.0, 10.0, 20.0, 40.0), vocab_size=30522)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def tiny_model(heads=ALL_HEADS, **kw) -> MRPLIPModel:
    torch.manual_seed(0)
    settings = ModelSettings(text_encoder="random", text_config=TINY_TEXT, embed_dim=8, fusion_layers=1,
                             keyword_fusion_layers=1, decoder_layers=1, dropout=0.0, **kw)
    text = build_text_encoder("random", TINY_TEXT, vocab_size=DIMS.vocab_size)
    return MRPLIPModel(settings, DIMS, text, heads=heads, keyword_top_k=2)


def fake_batch(tokenizer, b=2, p=3, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["tumor cells with large nuclei", "loose stroma", "dense lymphocytes in clusters",
                "necrotic debris", "fat cells", "smooth muscle fibers"][: b * p]
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    mlm = mask_tokens(ids, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                      special_token_ids=tokenizer.all_special_ids, attention_mask=mask, mask_prob=0.5, generator=g)
    plm = make_prefix_lm_batch(ids, mask, generator=g)
    shape = lambda t: t.reshape(b, p, *t.shape[1:])  # noqa: E731
    return {
        "features": torch.randn(b, p, DIMS.image_dim, generator=g).half(),
        "level": torch.tensor([[0, 1, 2]] * b), "magnification": torch.tensor([[5.0, 10.0, 20.0]] * b),
        "parent": torch.tensor([[-1, 0, 1]] * b),
        "input_ids": shape(ids), "attention_mask": shape(mask), "mlm_input_ids": shape(mlm.input_ids),
        "mlm_labels": shape(mlm.labels), "plm_labels": shape(plm.labels), "plm_prefix": shape(plm.prefix_lengths),
        "keyword_features": torch.randn(b, k, DIMS.keyword_dim, generator=g).half(),
        "keyword_mask": torch.tensor([[True] * k, [True] * (k - 2) + [False] * 2]),
    }


def test_only_the_modules_of_active_terms_are_built():
    full = tiny_model()
    for name in ("fusion", "keyword_fusion", "decoder", "mlm_head", "plm_head", "keyword_proj"):
        assert hasattr(full, name)
    contrastive = tiny_model(heads=("itc", "cvta"))
    assert hasattr(contrastive, "keyword_proj")
    for name in ("fusion", "keyword_fusion", "decoder", "mlm_head", "plm_head"):
        assert not hasattr(contrastive, name)


def test_magnification_embedding_changes_the_visual_token():
    m = tiny_model().eval()
    x = torch.randn(3, DIMS.image_dim)
    a, b = m.visual_tokens(x, torch.tensor([0, 0, 0])), m.visual_tokens(x, torch.tensor([0, 3, 0]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_fusion_ignores_padding_and_reads_the_image(tokenizer):
    m = tiny_model().eval()
    enc = tokenizer(["tumor cells", "a much longer caption about stroma"], padding=True, return_tensors="pt")
    states = m.text_states(enc["input_ids"], enc["attention_mask"])
    image = torch.randn(2, 1, 32)
    fused = m.fuse(image, states, enc["attention_mask"])
    n = int(enc["attention_mask"][0].sum())
    alone = m.fuse(image[:1], states[:1, :n], enc["attention_mask"][:1, :n])
    assert torch.allclose(fused[:1], alone, atol=1e-5)  # padding changes nothing
    assert not torch.allclose(m.fuse(torch.randn(2, 1, 32), states, enc["attention_mask"]), fused)


def test_prefix_lm_decoder_is_causal_on_the_suffix(tokenizer):
    m = tiny_model().eval()
    enc = tokenizer(["dense small round nuclei in clusters"], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    prefix = torch.tensor([3])
    image = torch.randn(1, 1, 32)
    out = m.decode(ids, mask, prefix, image)
    changed = ids.clone()
    changed[0, 5] = tokenizer.convert_tokens_to_ids("fat")
    out2 = m.decode(changed, mask, prefix, image)
    assert torch.allclose(out[0, :5], out2[0, :5], atol=1e-6)  # suffix positions before 5 cannot see it
    assert not torch.allclose(out[0, 5:], out2[0, 5:])
    changed_prefix = ids.clone()
    changed_prefix[0, 2] = tokenizer.convert_tokens_to_ids("fat")
    assert not torch.allclose(m.decode(changed_prefix, mask, prefix, image)[0, 1], out[0, 1])  # prefix: bidirectional
    assert not torch.allclose(m.decode(ids, mask, prefix, torch.randn(1, 1, 32))[0, 0], out[0, 0])  # sees the image


def test_text_guided_representation_uses_selected_keywords_only():
    m = tiny_model().eval()
    v = torch.randn(2, 32)
    kw = torch.randn(2, 2, 32)
    z = m.text_guided(v, kw, torch.tensor([[True, False], [True, True]]))
    z_changed = m.text_guided(v, torch.stack([torch.stack([kw[0, 0], torch.randn(32)]), kw[1]]),
                              torch.tensor([[True, False], [True, True]]))
    assert torch.allclose(z[0], z_changed[0], atol=1e-6)  # an invalid slot is ignored
    z_none = m.text_guided(v, kw, torch.zeros(2, 2, dtype=torch.bool))
    assert torch.isfinite(z_none).all()  # a bag without keywords still gets a z


def test_objective_compact_logits_equal_full_losses(tokenizer):
    m = tiny_model()
    loss = MRPLIPLoss.from_config({"weights": {"itc": 0, "itm": 0, "cvta": 0, "mrtva": 0}}, fusion_dim=32, representation_dim=32)
    objective = MRPLIPObjective(m, loss).eval()
    batch = fake_batch(tokenizer)
    out = objective(batch)
    n = 6
    ids, mask = batch["input_ids"].reshape(n, -1), batch["attention_mask"].reshape(n, -1)
    tokens = m.visual_tokens(batch["features"].reshape(n, -1), batch["level"].reshape(n))
    fused = m.fuse_tokens(tokens[:, None], m.text_states(batch["mlm_input_ids"].reshape(n, -1), mask), mask)
    full_mlm = F.cross_entropy(m.mlm_logits(fused).transpose(1, 2), batch["mlm_labels"].reshape(n, -1), ignore_index=IGNORE_INDEX)
    logits = m.plm_logits(m.decode(ids, mask, batch["plm_prefix"].reshape(n), tokens[:, None]))
    full_plm = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["plm_labels"].reshape(n, -1)[:, 1:], ignore_index=IGNORE_INDEX)
    assert torch.allclose(out["mlm"], full_mlm, atol=1e-5) and torch.allclose(out["plm"], full_plm, atol=1e-5)
    assert set(out) >= {"mlm", "plm", "loss"} and "itc" not in out


def test_objective_runs_every_term_and_backpropagates(tokenizer):
    m = tiny_model()
    loss = MRPLIPLoss.from_config({"cvta": {"k_o": 2}}, fusion_dim=32, representation_dim=32)
    objective = MRPLIPObjective(m, loss)
    out = objective(fake_batch(tokenizer), torch.Generator().manual_seed(0))
    assert {"itc", "itm", "mlm", "plm", "cvta", "mrtva", "loss", "loss_bl"} <= set(out)
    assert "mrtva/5x-10x" in out and "mrtva/10x-20x" in out
    out["loss"].backward()
    no_grad = [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # every built parameter is used (DDP needs no find_unused_parameters)


def test_duplicate_captions_are_never_negatives():
    ids = torch.tensor([[1, 2], [1, 2], [3, 4]])
    assert duplicate_pairs(ids).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert duplicate_pairs(torch.tensor([[1, 2], [1, 2]])).tolist() == [[True, False], [False, True]]


def test_magnification_levels_map_to_nearest_trained_magnification():
    grid = (5.0, 10.0, 20.0, 40.0)
    assert magnification_levels(20.0, grid, 3).tolist() == [2, 2, 2]
    assert magnification_levels([5, 9.7, 40, 60, 2.5], grid, 5).tolist() == [0, 1, 3, 3, 0]
    with pytest.raises(ValueError):
        magnification_levels([5, 10], grid, 3)


def test_export_roundtrip(tmp_path, tokenizer):
    m = tiny_model().eval()
    tokenizer.save_pretrained(str(tmp_path / TOKENIZER))
    save_export(tmp_path, m, itc_temperature=0.05, extra={"max_caption_tokens": 32})
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["format"] == "mrplip.pretrained/1" and meta["dims"]["image_dim"] == 12
    loaded = load(tmp_path)
    feats = torch.randn(4, 12)
    img = loaded.encode_image(feats, magnification=[5, 10, 20, 40])
    assert img.shape == (4, 8) and torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    expected = F.normalize(m.image_embedding(m.visual_tokens(feats, torch.tensor([0, 1, 2, 3]))), dim=-1)
    assert torch.allclose(img, expected, atol=1e-6)
    txt = loaded.encode_text(["tumor", "stroma with fibers"])
    assert txt.shape == (2, 8) and abs(loaded.logit_scale - 20.0) < 1e-9
    enc = tokenizer(["tumor", "stroma with fibers"], padding=True, return_tensors="pt")
    expected_t = F.normalize(m.text_embedding(m.text_states(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"]), dim=-1)
    assert torch.allclose(txt, expected_t, atol=1e-5)
    with pytest.raises(ValueError, match="features must be"):
        loaded.encode_image(torch.randn(2, 5), 20.0)
