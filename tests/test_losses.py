"""Unit tests of the MR-PLIP losses against independent computations.

Every reference below is written with plain Python loops and ``math`` on tiny inputs,
not with the vectorised code under test. The two-process ITC test lives in
``test_losses_dist.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mrplip_core.data.lm_inputs import IGNORE_INDEX, make_prefix_lm_batch, mask_tokens
from mrplip_core.losses import (
    DEFAULT_CONFIG,
    CVTALoss,
    ITCLoss,
    ITMLoss,
    LogitScale,
    MLMLoss,
    MRPLIPLoss,
    MRTVALoss,
    PLMLoss,
    cosine_similarity_matrix,
    negative_cosine,
    parent_child_pairs,
    sample_hard_negatives,
    select_topk_keywords,
)
from mrplip_core.model.layers import prefix_lm_attention_mask

# float(loss) on a tensor that still requires grad is what these tests do on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")

# ----------------------------------------------------------------------------- helpers


def rows(t: Tensor) -> list[list[float]]:
    return [[float(x) for x in row] for row in t.detach().double()]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def unit(a: list[float]) -> list[float]:
    norm = math.sqrt(dot(a, a))
    return [x / norm for x in a]


def cos(a: list[float], b: list[float]) -> float:
    return dot(unit(a), unit(b))


def log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def cross_entropy_row(logits: list[float], target: int) -> float:
    return log_sum_exp(logits) - logits[target]


# ----------------------------------------------------------------------------- temperature


def test_logit_scale_starts_at_clip_init_and_clamps() -> None:
    scale = LogitScale(0.07, max_scale=100.0)
    assert float(scale().detach()) == pytest.approx(1 / 0.07, rel=1e-6)
    assert scale.temperature == pytest.approx(0.07, rel=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    value = scale()
    assert float(value.detach()) == pytest.approx(100.0, rel=1e-6)
    value.backward()
    assert float(scale.log_scale.grad) == 0.0  # clamped: no gradient pushes it further


# ----------------------------------------------------------------------------- ITC


def itc_reference(image: Tensor, text: Tensor, scale: float) -> float:
    image_rows, text_rows = [unit(r) for r in rows(image)], [unit(r) for r in rows(text)]
    n = len(image_rows)
    logits = [[scale * dot(image_rows[i], text_rows[j]) for j in range(n)] for i in range(n)]
    i2t = sum(cross_entropy_row(logits[i], i) for i in range(n)) / n
    t2i = sum(cross_entropy_row([logits[i][j] for i in range(n)], j) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_itc_single_process_matches_loop() -> None:
    torch.manual_seed(0)
    image, text = torch.randn(5, 4), torch.randn(5, 4)
    loss = ITCLoss()
    out = loss(image, text)
    assert set(out) == {"itc", "itc/temperature"}
    assert float(out["itc"]) == pytest.approx(itc_reference(image, text, 1 / 0.07), rel=1e-5)
    assert float(out["itc/temperature"]) == pytest.approx(0.07, rel=1e-5)
    assert not out["itc/temperature"].requires_grad


def test_itc_gradient_reaches_features_and_temperature() -> None:
    torch.manual_seed(1)
    image = torch.randn(4, 3, requires_grad=True)
    text = torch.randn(4, 3, requires_grad=True)
    loss = ITCLoss()
    loss(image, text)["itc"].backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    assert loss.logit_scale.log_scale.grad is not None


def _fake_two_ranks(monkeypatch: pytest.MonkeyPatch, rank: int, other: dict[str, Tensor]) -> None:
    """Pretend to be ``rank`` of 2; the other rank holds other['image'], other['text']."""
    calls = iter(["image", "text"] * 10)

    def fake_all_gather(tensor_list: list[Tensor], tensor: Tensor, group: object = None) -> None:
        which = next(calls)
        with torch.no_grad():  # like the real collective: no autograd history
            tensor_list[rank].copy_(tensor)
            tensor_list[1 - rank].copy_(other[which])

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", fake_all_gather)


@pytest.mark.parametrize("rank", [0, 1])
def test_itc_fake_collectives_global_mode(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    torch.manual_seed(2)
    image, text = torch.randn(6, 3), torch.randn(6, 3)
    mine = slice(3 * rank, 3 * rank + 3)
    theirs = slice(3 * (1 - rank), 3 * (1 - rank) + 3)
    single = image.clone().requires_grad_(), text.clone().requires_grad_()
    ITCLoss()(*single)["itc"].backward()

    # the other rank sends its features after normalisation, as ITCLoss does
    other = {"image": F.normalize(image[theirs], dim=-1), "text": F.normalize(text[theirs], dim=-1)}
    _fake_two_ranks(monkeypatch, rank, other)
    local_image = image[mine].clone().requires_grad_()
    local_text = text[mine].clone().requires_grad_()
    out = ITCLoss()(local_image, local_text)
    out["itc"].backward()
    assert float(out["itc"]) == pytest.approx(itc_reference(image, text, 1 / 0.07), rel=1e-5)
    torch.testing.assert_close(local_image.grad, single[0].grad[mine])
    torch.testing.assert_close(local_text.grad, single[1].grad[mine])


def test_itc_fake_collectives_local_mode_offsets_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    other = {"image": F.normalize(image[:2], dim=-1), "text": F.normalize(text[:2], dim=-1)}
    _fake_two_ranks(monkeypatch, 1, other)
    loss = ITCLoss(local_loss=True)
    assert loss.get_ground_truth(2, torch.device("cpu")).tolist() == [2, 3]
    value = float(loss(image[2:], text[2:])["itc"])
    # rank 1's rows of the global logits, positives at columns 2 and 3
    image_rows, text_rows = [unit(r) for r in rows(image)], [unit(r) for r in rows(text)]
    s = 1 / 0.07
    i2t = [cross_entropy_row([s * dot(image_rows[i], t) for t in text_rows], i) for i in (2, 3)]
    t2i = [cross_entropy_row([s * dot(text_rows[j], v) for v in image_rows], j) for j in (2, 3)]
    assert value == pytest.approx((sum(i2t) / 2 + sum(t2i) / 2) / 2, rel=1e-5)


def test_itc_similarity_is_local_scaled_cosine() -> None:
    torch.manual_seed(4)
    image, text = torch.randn(3, 4), torch.randn(3, 4)
    sim = ITCLoss().similarity(image, text)
    expected = [[cos(a, b) / 0.07 for b in rows(text)] for a in rows(image)]
    torch.testing.assert_close(sim, torch.tensor(expected, dtype=sim.dtype), rtol=1e-5, atol=1e-5)
    assert not sim.requires_grad


# ----------------------------------------------------------------------------- ITM


def test_hard_negatives_never_pick_the_positive_or_excluded() -> None:
    generator = torch.Generator().manual_seed(0)
    n = 64
    sim = torch.randn(n, n, generator=generator) * 3
    sim.fill_diagonal_(50.0)  # the positive is by far the most similar
    exclude = torch.eye(n, dtype=torch.bool)
    exclude[torch.arange(n), (torch.arange(n) + 1) % n] = True  # e.g. a duplicate caption
    for _ in range(20):
        picked = sample_hard_negatives(sim, exclude, generator).tolist()
        assert all(picked[i] != i and picked[i] != (i + 1) % n for i in range(n))


def test_hard_negatives_pick_the_hardest_when_peaked() -> None:
    generator = torch.Generator().manual_seed(1)
    sim = torch.zeros(5, 5)
    hardest = [3, 2, 4, 0, 1]
    for i, j in enumerate(hardest):
        sim[i, i] = 100.0
        sim[i, j] = 40.0
    itm = ITMLoss(dim=4)
    for _ in range(20):
        negative_text, negative_image = itm.sample_negatives(sim, generator=generator)
        assert negative_text.tolist() == hardest
        # text j's hardest image is the image i whose hardest text is j
        assert negative_image.tolist() == [hardest.index(j) for j in range(5)]


def test_hard_negatives_follow_softmax_of_similarity() -> None:
    draws = 4000  # one query repeated: every row is an independent draw
    sim = torch.tensor([[9.0, 1.0, 0.0, 2.0]]).expand(draws, 4)
    exclude = torch.tensor([[True, False, False, False]]).expand(draws, 4)
    picked = sample_hard_negatives(sim, exclude, torch.Generator().manual_seed(2)).tolist()
    weights = [0.0, math.exp(1.0), math.exp(0.0), math.exp(2.0)]
    for j in range(4):
        assert picked.count(j) / draws == pytest.approx(weights[j] / sum(weights), abs=0.025)


def test_hard_negatives_are_reproducible_and_need_two_pairs() -> None:
    sim = torch.randn(8, 8)
    a = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(7))
    b = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="at least one allowed negative"):
        sample_hard_negatives(torch.zeros(1, 1))


def test_itm_loss_matches_hand_computation() -> None:
    torch.manual_seed(5)
    batch, length, dim = 3, 4, 2
    image_tokens = torch.randn(batch, 2, dim, requires_grad=True)
    text_tokens = torch.randn(batch, length, dim)
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    sim = torch.full((batch, batch), 0.0)
    for i in range(batch):
        sim[i, i] = 100.0
        sim[i, (i + 1) % batch] = 50.0  # text (i+1) is image i's hardest negative
    calls: list[int] = []

    def fuse(image: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        calls.append(image.shape[0])
        text_mean = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return image.mean(1) * text_mean

    itm = ITMLoss(dim)
    with torch.no_grad():
        itm.head.weight.copy_(torch.tensor([[0.7, -1.3]]))
        itm.head.bias.fill_(0.2)
    out = itm(
        fuse, image_tokens, text_tokens, text_mask, sim, generator=torch.Generator().manual_seed(0)
    )
    assert calls == [3 * batch]

    def pooled(i: int, j: int) -> list[float]:
        img = [sum(image_tokens[i, k, d].item() for k in range(2)) / 2 for d in range(dim)]
        m = text_mask[j].tolist()
        txt = [
            sum(text_tokens[j, t, d].item() * m[t] for t in range(length)) / sum(m)
            for d in range(dim)
        ]
        return [img[d] * txt[d] for d in range(dim)]

    def bce(i: int, j: int, target: int) -> float:
        logit = 0.7 * pooled(i, j)[0] - 1.3 * pooled(i, j)[1] + 0.2
        p = 1 / (1 + math.exp(-logit))
        return -math.log(p) if target else -math.log(1 - p)

    terms = [bce(i, i, 1) for i in range(batch)]
    terms += [bce(i, (i + 1) % batch, 0) for i in range(batch)]  # image i, its hard text
    terms += [bce((j - 1) % batch, j, 0) for j in range(batch)]  # text j, its hard image
    assert float(out["itm"]) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert 0.0 <= float(out["itm/accuracy"]) <= 1.0
    out["itm"].backward()
    assert image_tokens.grad.abs().sum() > 0 and itm.head.weight.grad is not None


# ----------------------------------------------------------------------------- MLM

SPECIAL = {"pad": 0, "cls": 1, "sep": 2, "mask": 3}
VOCAB = 1000


def random_captions(batch: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
    lengths = torch.randint(3, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = SPECIAL["cls"]
    ids[torch.arange(batch), lengths - 1] = SPECIAL["sep"]
    ids[mask == 0] = SPECIAL["pad"]
    return ids, mask


def test_mlm_masking_rates_and_protected_tokens() -> None:
    ids, mask = random_captions(128, 256, seed=0)
    out = mask_tokens(
        ids,
        mask_token_id=SPECIAL["mask"],
        vocab_size=VOCAB,
        special_token_ids=list(SPECIAL.values()),
        attention_mask=mask,
        generator=torch.Generator().manual_seed(0),
    )
    special = torch.isin(ids, torch.tensor(list(SPECIAL.values())))
    maskable = (mask == 1) & ~special
    picked = out.labels != IGNORE_INDEX
    assert not (picked & ~maskable).any()  # never special tokens or padding
    assert torch.equal(out.input_ids[~picked], ids[~picked])  # untouched elsewhere
    assert torch.equal(out.labels[picked], ids[picked])
    rate = picked.sum().item() / maskable.sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    n = picked.sum().item()
    to_mask = (out.input_ids == SPECIAL["mask"]) & picked
    changed = (out.input_ids != ids) & picked & ~to_mask
    kept = (out.input_ids == ids) & picked
    assert to_mask.sum().item() / n == pytest.approx(0.8, abs=0.02)
    assert changed.sum().item() / n == pytest.approx(0.1, abs=0.015)
    assert kept.sum().item() / n == pytest.approx(0.1, abs=0.015)
    random_ids = out.input_ids[changed]
    assert not torch.isin(random_ids, torch.tensor(list(SPECIAL.values()))).any()
    assert int(random_ids.min()) >= 0 and int(random_ids.max()) < VOCAB


def test_mlm_masking_is_reproducible() -> None:
    ids, mask = random_captions(4, 16, seed=1)
    kwargs = dict(
        mask_token_id=3, vocab_size=VOCAB, special_token_ids=[0, 1, 2, 3], attention_mask=mask
    )
    a = mask_tokens(ids, **kwargs, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, **kwargs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def test_mlm_loss_matches_loop_and_handles_no_labels() -> None:
    torch.manual_seed(6)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[-100, 3, -100, 6, -100], [0, -100, -100, -100, 2]])
    value = float(MLMLoss()(logits, labels)["mlm"])
    terms = [
        cross_entropy_row(rows(logits[b])[t], int(labels[b, t]))
        for b in range(2)
        for t in range(5)
        if labels[b, t] != -100
    ]
    assert value == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    empty = MLMLoss()(logits, torch.full((2, 5), -100))["mlm"]
    assert float(empty) == 0.0
    empty.backward()  # still part of the graph


# ----------------------------------------------------------------------------- PLM


def test_plm_labels_are_ignored_exactly_on_prefix_and_padding() -> None:
    ids, mask = random_captions(64, 12, seed=2)
    lengths = mask.sum(1).tolist()
    for batch in (
        make_prefix_lm_batch(ids, mask, generator=torch.Generator().manual_seed(0)),
        make_prefix_lm_batch(ids, mask, prefix_lengths=torch.tensor([min(2, n) for n in lengths])),
    ):
        assert torch.equal(batch.input_ids, ids)
        for b, n in enumerate(lengths):
            p = int(batch.prefix_lengths[b])
            for t in range(12):
                expected = int(ids[b, t]) if p <= t < n else IGNORE_INDEX
                assert int(batch.labels[b, t]) == expected
    random_batch = make_prefix_lm_batch(
        ids, mask, min_prefix=2, generator=torch.Generator().manual_seed(1)
    )
    for b, n in enumerate(lengths):
        p = int(random_batch.prefix_lengths[b])
        assert (2 <= p <= n - 1) if n > 2 else p == n


def test_plm_rejects_left_padding() -> None:
    with pytest.raises(ValueError, match="right-padded"):
        make_prefix_lm_batch(torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]))


def test_plm_loss_is_next_token_cross_entropy_on_the_suffix() -> None:
    torch.manual_seed(7)
    ids = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
    mask = (ids != 0).long()
    batch = make_prefix_lm_batch(ids, mask, prefix_lengths=torch.tensor([2, 1]))
    logits = torch.randn(2, 6, 11)
    value = float(PLMLoss()(logits, batch.labels)["plm"])
    # caption 0 predicts tokens 2..4 (6, 7, 2) from positions 1..3; caption 1 tokens 1..3
    terms = [cross_entropy_row(rows(logits[0])[t], int(ids[0, t + 1])) for t in (1, 2, 3)]
    terms += [cross_entropy_row(rows(logits[1])[t], int(ids[1, t + 1])) for t in (0, 1, 2)]
    assert value == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_prefix_lm_attention_mask_matches_loop() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    prefix = torch.tensor([2, 1])
    allowed = prefix_lm_attention_mask(prefix, mask)
    for b in range(2):
        for q in range(5):
            for k in range(5):
                expected = bool(mask[b, k]) and (k < prefix[b] or k <= q)
                assert bool(allowed[b, q, k]) == expected


# ----------------------------------------------------------------------------- CVTA


def cvta_bags() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """3 bags: (5 patches, 7 keywords), (3 patches, 4 keywords), (4 patches, 2 keywords)."""
    generator = torch.Generator().manual_seed(8)
    visual = torch.randn(3, 5, 6, generator=generator)
    keywords = torch.randn(3, 7, 6, generator=generator)
    visual_mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool
    )
    keyword_mask = torch.zeros(3, 7, dtype=torch.bool)
    keyword_mask[0, :] = True
    keyword_mask[1, :4] = True
    keyword_mask[2, :2] = True
    return visual, keywords, visual_mask, keyword_mask


def brute_force_topk(
    visual, keywords, visual_mask, keyword_mask, k
) -> dict[tuple[int, int], set[int]]:
    chosen = {}
    for b in range(visual.shape[0]):
        kw = [(j, rows(keywords[b])[j]) for j in range(keywords.shape[1]) if keyword_mask[b, j]]
        for a in range(visual.shape[1]):
            if not visual_mask[b, a]:
                continue
            v = rows(visual[b])[a]
            ranked = sorted(kw, key=lambda item: cos(v, item[1]), reverse=True)
            chosen[(b, a)] = {j for j, _ in ranked[:k]}
    return chosen


def cvta_reference(
    visual, keywords, visual_mask, keyword_mask, k, tau, denominator="all_keywords"
) -> float:
    chosen = brute_force_topk(visual, keywords, visual_mask, keyword_mask, k)
    bag_losses = []
    for b in range(visual.shape[0]):
        real_keywords = [j for j in range(keywords.shape[1]) if keyword_mask[b, j]]
        patch_losses = []
        for a in range(visual.shape[1]):
            if not visual_mask[b, a]:
                continue
            positives = chosen[(b, a)]
            negatives = [j for j in real_keywords if j not in positives]
            if not negatives:
                continue
            v = rows(visual[b])[a]
            s = {j: cos(v, rows(keywords[b])[j]) / tau for j in real_keywords}
            terms = []
            for p in positives:
                pool = real_keywords if denominator == "all_keywords" else [p, *negatives]
                terms.append(-(s[p] - log_sum_exp([s[j] for j in pool])))
            patch_losses.append(sum(terms) / len(terms))
        if patch_losses:
            bag_losses.append(sum(patch_losses) / len(patch_losses))
    return sum(bag_losses) / len(bag_losses)


@pytest.mark.parametrize("k", [1, 2, 3, 9])
def test_cvta_topk_matches_brute_force(k: int) -> None:
    visual, keywords, visual_mask, keyword_mask = cvta_bags()
    sim = cosine_similarity_matrix(visual, keywords, visual_mask, keyword_mask)
    topk = select_topk_keywords(sim, k, keyword_mask, visual_mask)
    assert topk.indices.shape == (3, 5, min(k, 7))
    expected = brute_force_topk(visual, keywords, visual_mask, keyword_mask, k)
    for b in range(3):
        for a in range(5):
            got = {int(j) for j, ok in zip(topk.indices[b, a], topk.valid[b, a], strict=True) if ok}
            if visual_mask[b, a]:
                assert got == expected[(b, a)]
                assert all(keyword_mask[b, j] for j in got)  # padding is never picked
            else:
                assert got == set()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("denominator", ["all_keywords", "negatives_only"])
def test_cvta_value_matches_loop(k: int, denominator: str) -> None:
    visual, keywords, visual_mask, keyword_mask = cvta_bags()
    loss = CVTALoss(k_o=k, denominator=denominator)
    out = loss(visual, keywords, visual_mask, keyword_mask)
    expected = cvta_reference(visual, keywords, visual_mask, keyword_mask, k, 0.07, denominator)
    assert float(out["cvta"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["cvta/temperature"]) == pytest.approx(0.07, rel=1e-5)


def test_cvta_padding_is_never_positive_or_negative() -> None:
    visual, keywords, visual_mask, keyword_mask = cvta_bags()
    visual = visual.clone().requires_grad_()
    keywords_req = keywords.clone().requires_grad_()
    loss = CVTALoss(k_o=2)
    reference = loss(visual, keywords_req, visual_mask, keyword_mask)["cvta"]
    reference.backward()
    assert torch.isfinite(visual.grad).all() and torch.isfinite(keywords_req.grad).all()
    assert (visual.grad[~visual_mask] == 0).all()
    assert (keywords_req.grad[~keyword_mask] == 0).all()
    # padded entries aligned with the patches would be the best keywords if they counted
    poisoned_keywords = keywords.clone()
    poisoned_keywords[~keyword_mask] = visual[:, :1].detach().expand(-1, 7, -1)[~keyword_mask] * 5
    poisoned_visual = visual.detach().clone()
    poisoned_visual[~visual_mask] = float("nan")
    again = loss(poisoned_visual, poisoned_keywords, visual_mask, keyword_mask)["cvta"]
    assert float(again) == pytest.approx(float(reference), rel=1e-6)
    # more padding changes nothing
    wider_v = torch.cat([visual.detach(), torch.randn(3, 2, 6)], dim=1)
    wider_k = torch.cat([keywords, torch.randn(3, 3, 6)], dim=1)
    wider = loss(
        wider_v,
        wider_k,
        torch.cat([visual_mask, torch.zeros(3, 2, dtype=torch.bool)], dim=1),
        torch.cat([keyword_mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1),
    )["cvta"]
    assert float(wider) == pytest.approx(float(reference), rel=1e-6)


def test_cvta_bag_without_negatives_is_skipped_and_empty_batch_is_zero() -> None:
    visual, keywords, visual_mask, keyword_mask = cvta_bags()
    # k_o = 2 leaves bag 2 (2 keywords) without negatives: it must not count
    full = float(CVTALoss(k_o=2)(visual, keywords, visual_mask, keyword_mask)["cvta"])
    two_bags = float(
        CVTALoss(k_o=2)(visual[:2], keywords[:2], visual_mask[:2], keyword_mask[:2])["cvta"]
    )
    assert full == pytest.approx(two_bags, rel=1e-6)
    visual = visual.clone().requires_grad_()
    empty = CVTALoss(k_o=7)(visual, keywords, visual_mask, keyword_mask)["cvta"]
    assert float(empty) == 0.0
    empty.backward()
    assert torch.isfinite(visual.grad).all()


def test_cvta_temperature_is_learned() -> None:
    visual, keywords, visual_mask, keyword_mask = cvta_bags()
    loss = CVTALoss(k_o=2)
    loss(visual, keywords, visual_mask, keyword_mask)["cvta"].backward()
    assert loss.logit_scale.log_scale.grad is not None
    assert float(loss.logit_scale.log_scale.grad) != 0.0


# ----------------------------------------------------------------------------- MRTVA


def quad_tree(levels: int) -> tuple[Tensor, Tensor]:
    """parent_index and magnification of one bag: 1 x 5x, 4 x 10x, 16 x 20x, ..."""
    parent, magnification = [-1], [5]
    frontier = [0]
    for level in range(1, levels):
        new = []
        for node in frontier:
            for _ in range(4):
                parent.append(node)
                magnification.append(5 * 2**level)
                new.append(len(parent) - 1)
        frontier = new
    return torch.tensor(parent), torch.tensor(magnification)


def test_parent_child_pairs_full_tree_and_left_out_levels() -> None:
    parent, magnification = quad_tree(3)  # 1 + 4 + 16 nodes
    pairs = parent_child_pairs(parent, mode="adjacent")
    assert sorted(map(tuple, pairs.tolist())) == sorted((int(parent[i]), i) for i in range(1, 21))
    # leave 10x out: each 20x patch pairs with the 5x root
    skip_10x = parent_child_pairs(parent, present=magnification != 10, mode="adjacent")
    assert sorted(map(tuple, skip_10x.tolist())) == [(0, i) for i in range(5, 21)]
    # leave 5x out: the roots of the remaining forest are the 10x patches
    skip_5x = parent_child_pairs(parent, present=magnification != 5, mode="adjacent")
    assert sorted(map(tuple, skip_5x.tolist())) == sorted((int(parent[i]), i) for i in range(5, 21))
    everything = parent_child_pairs(parent, mode="lineage")
    assert len(everything) == 4 + 16 * 2
    assert (0, 20) in set(map(tuple, everything.tolist()))


def mrtva_reference(loss: MRTVALoss, z: Tensor, pairs: Tensor) -> float:
    used = sorted({int(i) for i in pairs.flatten()})
    with torch.no_grad():
        projected = loss.projector(z[used])
        predicted = loss.predictor(projected)
    position = {index: row for row, index in enumerate(used)}
    zs, ps = rows(projected), rows(predicted)
    total = 0.0
    for parent, child in pairs.tolist():
        p1, z1 = ps[position[parent]], zs[position[parent]]
        p2, z2 = ps[position[child]], zs[position[child]]
        total += -cos(p1, z2) / 2 - cos(p2, z1) / 2
    return total / len(pairs)


def test_mrtva_value_matches_hand_computation() -> None:
    torch.manual_seed(9)
    parent, magnification = quad_tree(3)
    z = torch.randn(21 + 3, 8)  # 3 trailing padding rows, never in a pair
    pairs = parent_child_pairs(parent, mode="adjacent")
    loss = MRTVALoss(8, proj_dim=6, pred_hidden_dim=3)
    out = loss(z, pairs, torch.cat([magnification, torch.zeros(3, dtype=torch.long)]))
    assert float(out["mrtva"]) == pytest.approx(mrtva_reference(loss, z, pairs), rel=1e-5)
    assert set(out) == {"mrtva", "mrtva/5x-10x", "mrtva/10x-20x"}
    # 4 pairs 5x-10x and 16 pairs 10x-20x: their weighted mean is the loss
    mixed = (4 * float(out["mrtva/5x-10x"]) + 16 * float(out["mrtva/10x-20x"])) / 20
    assert mixed == pytest.approx(float(out["mrtva"]), rel=1e-5)


def test_negative_cosine_stops_gradient_of_the_target() -> None:
    p = torch.randn(4, 5, requires_grad=True)
    z = torch.randn(4, 5, requires_grad=True)
    value = negative_cosine(p, z)
    expected = [-cos(a, b) for a, b in zip(rows(p), rows(z), strict=True)]
    assert value.tolist() == pytest.approx(expected, rel=1e-5)
    value.sum().backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


class _FixedPrediction(nn.Module):
    """Predictor replaced by a leaf tensor: the only path left to z is the target branch."""

    def __init__(self, prediction: Tensor) -> None:
        super().__init__()
        self.prediction = prediction

    def forward(self, projected: Tensor) -> Tensor:
        return self.prediction


def test_mrtva_target_branch_gets_no_gradient() -> None:
    torch.manual_seed(10)
    parent, _ = quad_tree(2)
    pairs = parent_child_pairs(parent, mode="adjacent")
    z = torch.randn(5, 8, requires_grad=True)
    loss = MRTVALoss(8)
    prediction = torch.randn(5, 8, requires_grad=True)
    loss.predictor = _FixedPrediction(prediction)
    loss(z, pairs)["mrtva"].backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0  # predictor branch
    assert z.grad is None  # target branch g(z) is stop-gradded
    assert all(param.grad is None for param in loss.projector.parameters())


def test_mrtva_gradient_equals_detached_reference_not_undetached() -> None:
    torch.manual_seed(11)
    parent, _ = quad_tree(2)
    pairs = parent_child_pairs(parent, mode="adjacent")
    z = torch.randn(5, 8)
    loss = MRTVALoss(8)

    def gradient(detach_target: bool | None) -> Tensor:
        x = z.clone().requires_grad_()
        if detach_target is None:
            value = loss(x, pairs)["mrtva"]
        else:
            projected = loss.projector(x)
            predicted = loss.predictor(projected)
            target = projected.detach() if detach_target else projected
            cosines = nn.functional.cosine_similarity
            value = sum(
                -cosines(predicted[a], target[b], dim=0) / 2
                - cosines(predicted[b], target[a], dim=0) / 2
                for a, b in pairs.tolist()
            ) / len(pairs)
        value.backward()
        return x.grad

    module_grad = gradient(None)
    torch.testing.assert_close(module_grad, gradient(True))
    assert not torch.allclose(module_grad, gradient(False))
    assert module_grad[0].abs().sum() > 0 and module_grad[1:].abs().sum() > 0  # parent and children


def test_mrtva_without_pairs_is_zero() -> None:
    z = torch.randn(3, 4, requires_grad=True)
    out = MRTVALoss(4)(z, torch.empty(0, 2, dtype=torch.long))
    assert float(out["mrtva"]) == 0.0
    out["mrtva"].backward()


# ----------------------------------------------------------------------------- total


class _Constant(nn.Module):
    def __init__(self, name: str, value: float) -> None:
        super().__init__()
        self.name = name
        self.value = nn.Parameter(torch.tensor(value))
        self.calls = 0

    def forward(self, scale: float = 1.0) -> dict[str, Tensor]:
        self.calls += 1
        return {self.name: self.value * scale, f"{self.name}/diag": self.value.detach()}


def test_total_weights_switches_and_named_terms() -> None:
    terms = {
        name: _Constant(name, value)
        for name, value in zip(
            ("itc", "itm", "mlm", "plm", "cvta", "mrtva"),
            (1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
            strict=True,
        )
    }
    total = MRPLIPLoss(terms, weights={"itm": 0.0, "cvta": 0.5, "mrtva": 2.0})
    assert total.active_terms == ("itc", "mlm", "plm", "cvta", "mrtva")
    assert not total.is_active("itm")
    inputs = {name: {} for name in total.active_terms}  # no inputs for the disabled term
    out = total(inputs)
    assert terms["itm"].calls == 0
    assert float(out["loss_bl"]) == pytest.approx(1 + 3 + 4)
    assert float(out["loss"]) == pytest.approx(1 + 3 + 4 + 0.5 * 5 + 2 * 6)
    assert float(out["cvta"]) == 5.0 and "cvta/diag" in out and "itm" not in out
    only_new = MRPLIPLoss({"cvta": terms["cvta"], "mrtva": None}, {})
    assert only_new.active_terms == ("cvta",)
    assert "loss_bl" not in only_new({"cvta": {"scale": 2.0}})
    with pytest.raises(ValueError, match="unknown loss term"):
        MRPLIPLoss(terms, weights={"itcc": 1.0})
    with pytest.raises(KeyError, match="mlm"):
        total({"itc": {}, "plm": {}, "cvta": {}, "mrtva": {}})


def test_total_from_config_runs_every_real_term() -> None:
    torch.manual_seed(12)
    config = {**DEFAULT_CONFIG, "weights": {**DEFAULT_CONFIG["weights"], "plm": 0.0}}
    total = MRPLIPLoss.from_config(config, fusion_dim=4, representation_dim=8)
    assert total.active_terms == ("itc", "itm", "mlm", "cvta", "mrtva")
    visual, keywords, visual_mask, keyword_mask = cvta_bags()
    parent, magnification = quad_tree(2)
    image, text = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    inputs = {
        "itc": {"image_features": image, "text_features": text},
        "itm": {
            "fuse": lambda i, t, m: i.mean(1)[:, :4] * t.mean(1)[:, :4],
            "image_tokens": image[:, None, :],
            "text_tokens": text[:, None, :].expand(4, 3, 6),
            "text_mask": torch.ones(4, 3),
            "sim_i2t": total.terms["itc"].similarity(image, text),
            "generator": torch.Generator().manual_seed(0),
        },
        "mlm": {
            "logits": torch.randn(4, 3, 10, requires_grad=True),
            "labels": torch.tensor([[1, -100, 2]] * 4),
        },
        "cvta": {
            "visual": visual,
            "keywords": keywords,
            "visual_mask": visual_mask,
            "keyword_mask": keyword_mask,
        },
        "mrtva": {
            "z": torch.randn(5, 8),
            "pairs": parent_child_pairs(parent, mode="adjacent"),
            "magnification": magnification,
        },
    }
    out = total(inputs)
    expected_keys = {
        "itc",
        "itc/temperature",
        "itm",
        "itm/accuracy",
        "mlm",
        "cvta",
        "cvta/temperature",
        "mrtva",
        "mrtva/5x-10x",
        "loss_bl",
        "loss",
    }
    assert set(out) == expected_keys
    parts = sum(float(out[name]) for name in ("itc", "itm", "mlm", "cvta", "mrtva"))
    assert float(out["loss"]) == pytest.approx(parts, rel=1e-5)
    out["loss"].backward()
    assert image.grad is not None
    assert total.terms["cvta"].logit_scale.log_scale.grad is not None


def test_config_sections_are_valid_keyword_arguments() -> None:
    with pytest.raises(ValueError, match=r"loss\.cvta: .*k0"):
        MRPLIPLoss.from_config({"cvta": {"k0": 3}}, fusion_dim=4, representation_dim=4)
    # the mlm / plm sections are the collator's settings: they must fit those helpers
    ids, mask = random_captions(2, 8, seed=3)
    mask_tokens(
        ids,
        mask_token_id=3,
        vocab_size=VOCAB,
        special_token_ids=[0, 1, 2, 3],
        attention_mask=mask,
        **DEFAULT_CONFIG["mlm"],
    )
    make_prefix_lm_batch(ids, mask, **DEFAULT_CONFIG["plm"])
