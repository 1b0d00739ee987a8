"""The bag dataset: index from the manifests, quad-tree sampling, lazy per-slide reads,
determinism of every draw, and the resumable distributed stream."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from mrplip_core.data import (
    BagDataset,
    BagStreamSampler,
    DataSettings,
    allocate_budget,
    build_bag_index,
    collate_bags,
    item_seed,
    load_slide,
    make_loader,
    sample_bag,
    slide_split,
)
from mrplip_core.data.lm_inputs import IGNORE_INDEX
from mrplip_core.testing.synthetic_corpus import write_synthetic_corpus
from mrplip_core.model import load_tokenizer
from mrplip_core.wsi.hierarchy import MANIFEST_COLUMNS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 ok slides (two 40x, one 20x scan: no 40x rows) + one failed; feature rows shuffled."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("results"), bags_per_slide=3, shuffle_feature_rows=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def settings(corpus, **kw) -> DataSettings:
    return DataSettings(results=str(corpus), val_fraction=0.0, **kw)


def test_synthetic_corpus_follows_the_artifact_contract(corpus):
    manifest = pd.read_parquet(corpus / "tiles" / "synth_a.parquet")
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert manifest.groupby("bag_id").size().tolist() == [85, 85, 85]
    assert sorted(pd.read_parquet(corpus / "tiles" / "synth_b.parquet")["magnification"].unique()) == [5, 10, 20]
    with h5py.File(corpus / "features" / "tiny-vit-random" / "synth_a.h5") as f:
        assert sorted(f) == ["10x", "20x", "40x", "5x"]
        assert f["40x/features"].dtype == np.float16 and f["40x/features"].shape == (3 * 64, 32)
    with h5py.File(corpus / "text_features" / "minilm" / "synth_a.h5") as f:
        assert {"bag_id", "keyword", "features"} <= set(f["keywords"])


def test_index_lists_bags_of_ok_slides_and_splits_by_slide(corpus):
    index = build_bag_index(settings(corpus).paths(), (5.0, 10.0, 20.0, 40.0), val_fraction=0.4, split_seed=3)
    assert set(index["slide_id"]) == {"synth_a", "synth_b", "synth_c"}  # the failed slide is left out
    assert len(index) == 9 and index.groupby("slide_id").size().tolist() == [3, 3, 3]
    assert index.groupby("slide_id")["split"].nunique().max() == 1  # a slide is never split
    assert index.equals(build_bag_index(settings(corpus).paths(), (5.0, 10.0, 20.0, 40.0), val_fraction=0.4, split_seed=3))
    # the split of a slide depends on its id and the seed only, not on the rest of the cohort
    assert [slide_split(s, 0.4, 3) for s in ("synth_a", "synth_b", "synth_c")] == (
        index.drop_duplicates("slide_id")["split"].tolist())
    shares = np.mean([slide_split(f"slide_{i}", 0.25, 0) == "val" for i in range(4000)])
    assert 0.22 < shares < 0.28


def test_index_names_missing_files(corpus, tmp_path):
    broken = write_synthetic_corpus(tmp_path / "r", bags_per_slide=1)
    (broken / "captions" / "synth_a.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="synth_a.*captions"):
        build_bag_index(settings(broken).paths(), (5.0,))


def test_allocate_budget_moves_missing_magnifications_and_surplus_down():
    assert allocate_budget([1, 4, 16, 64], [1, 2, 2, 2]) == [1, 2, 2, 2]
    assert allocate_budget([1, 4, 16, 0], [1, 2, 2, 2]) == [1, 2, 4, 0]  # 20x scan: 40x budget to 20x
    assert allocate_budget([1, 4, 16, 64], [2, 8, 2, 2]) == [1, 4, 7, 2]  # more than exists: pushed down
    assert allocate_budget([0, 4, 16, 64], [1, 2, 2, 2]) == [0, 3, 2, 2]
    assert sum(allocate_budget([1, 0, 0, 0], [1, 2, 2, 2])) == 7


@pytest.mark.parametrize("budget", [(1, 2, 2, 2), (1, 4, 4, 4), (1, 0, 3, 3), (0, 2, 2, 2), (3, 1, 1, 8)])
def test_sampled_patches_follow_quadtree_paths(corpus, budget):
    slide = load_slide(settings(corpus).paths(), "synth_a", (5.0, 10.0, 20.0, 40.0))
    members = next(iter(slide.bags.values()))
    lookup = {int(m): i for i, m in enumerate(members)}
    ancestor = np.asarray([lookup.get(int(slide.ancestor[m]), -1) for m in members])
    level = slide.level[members]
    for seed in range(5):
        nodes, parent = sample_bag(level, ancestor, budget, np.random.default_rng(seed))
        assert len(nodes) == sum(budget)  # fixed cost per bag
        assert np.all(np.diff(level[nodes]) >= 0)  # ordered by magnification
        for slot, node in enumerate(nodes):
            if parent[slot] >= 0:
                anc, chain = int(nodes[parent[slot]]), []
                a = int(ancestor[node])
                while a >= 0:
                    chain.append(a)
                    a = int(ancestor[a])
                assert anc in chain and level[anc] < level[node]  # a real, shallower ancestor
            else:
                assert level[node] == level[nodes].min()  # only the shallowest level is parentless
        # no repeats while the bag has enough patches
        assert len(set(nodes.tolist())) == len(nodes)


def test_sampling_spreads_over_parents():
    # one root, four children, each with four grandchildren; two children and four grandchildren
    level = np.array([0] + [1] * 4 + [2] * 16)
    ancestor = np.array([-1] + [0] * 4 + [1 + i // 4 for i in range(16)])
    nodes, parent = sample_bag(level, ancestor, (1, 2, 4), np.random.default_rng(0))
    grand = nodes[3:]
    assert sorted(np.bincount(ancestor[grand], minlength=5)[1:].tolist(), reverse=True)[:2] == [2, 2]
    assert set(ancestor[grand].tolist()) == set(nodes[1:3].tolist())


def test_item_reads_rows_by_patch_id_and_is_deterministic(corpus, tokenizer):
    s = settings(corpus)
    index = build_bag_index(s.paths(), s.magnifications, val_fraction=0)
    ds = BagDataset(index, s, tokenizer, seed=0)
    item = ds[(0, 0)]
    # recompute the features of the drawn patches straight from the file, by patch id
    slide = ds.store.slide("synth_a")
    members = slide.bags[index.loc[0, "bag_id"]]
    nodes, _ = sample_bag(slide.level[members], np.asarray(
        [{int(m): i for i, m in enumerate(members)}.get(int(slide.ancestor[m]), -1) for m in members]),
        s.patches_per_magnification, np.random.default_rng(item_seed(0, 0, 0)))
    with h5py.File(corpus / "features" / "tiny-vit-random" / "synth_a.h5") as f:
        for row, pos in zip(item["features"], members[nodes]):
            pid = slide.patch_ids[pos]
            group = f[f"{s.magnifications[slide.level[pos]]:g}x"]
            ids = list(group["patch_ids"].asstr()[()])
            assert torch.equal(row, torch.from_numpy(group["features"][ids.index(pid)]))
    caps = pd.read_parquet(corpus / "captions" / "synth_a.parquet").set_index("patch_id")["caption"]
    decoded = tokenizer.batch_decode(item["input_ids"], skip_special_tokens=True)
    assert decoded == [caps[slide.patch_ids[p]].lower() for p in members[nodes]]
    # every random choice is a function of (seed, epoch, index): same key, same item
    again = BagDataset(index, s, tokenizer, seed=0)[(0, 0)]
    assert all(torch.equal(item[k], again[k]) for k in item)
    other_epoch = ds[(1, 0)]
    assert not torch.equal(item["mlm_labels"], other_epoch["mlm_labels"]) or not torch.equal(item["features"], other_epoch["features"])


def test_item_fields(corpus, tokenizer):
    s = settings(corpus, patches_per_magnification=(1, 2, 2, 2), max_keywords=8)
    index = build_bag_index(s.paths(), s.magnifications, val_fraction=0)
    ds = BagDataset(index, s, tokenizer, seed=0)
    item_20x = ds[(0, int(np.flatnonzero(index["slide_id"] == "synth_b")[0]))]
    assert item_20x["magnification"].tolist() == [5, 10, 10, 20, 20, 20, 20]  # 40x budget went to 20x
    item = ds[(0, 0)]
    assert item["magnification"].tolist() == [5, 10, 10, 20, 20, 40, 40]
    assert item["parent"].tolist()[0] == -1 and (item["parent"][1:] >= 0).all()
    assert item["keyword_features"].shape == (8, 24) and item["keyword_mask"].any()
    assert not item["keyword_features"][~item["keyword_mask"]].any()
    picked = item["mlm_labels"] != IGNORE_INDEX
    assert torch.equal(item["mlm_labels"][picked], item["input_ids"][picked])
    suffix = item["plm_labels"] != IGNORE_INDEX
    assert (suffix.float().argmax(1) >= item["plm_prefix"]).all()


def test_collate_pads_captions_to_a_multiple_of_8(corpus, tokenizer):
    s = settings(corpus)
    index = build_bag_index(s.paths(), s.magnifications, val_fraction=0)
    ds = BagDataset(index, s, tokenizer)
    items = [ds[(0, i)] for i in range(3)]
    batch = collate_bags(items, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[:2] == (3, 7) and batch["input_ids"].shape[2] % 8 == 0
    n = items[0]["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :, :n], items[0]["input_ids"])
    assert (batch["mlm_labels"][0, :, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, :, n:] == 0).all()


def test_stream_is_resumable_and_independent_of_world_size():
    single = BagStreamSampler(10, 4, seed=1)
    ranks = [BagStreamSampler(10, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    for t in range(7):  # spans several epochs
        assert single.batch(t) == ranks[0].batch(t) + ranks[1].batch(t)
    resumed = iter(BagStreamSampler(10, 4, seed=1, start=5))
    assert next(resumed) == single.batch(5)
    epoch0 = [single.element(k) for k in range(10)]
    assert sorted(i for _, i in epoch0) == list(range(10)) and {e for e, _ in epoch0} == {0}
    assert [i for _, i in epoch0] != [i for _, i in (single.element(k) for k in range(10, 20))]


def test_loader_with_workers_gives_the_same_batches(corpus, tokenizer):
    s = settings(corpus)
    index = build_bag_index(s.paths(), s.magnifications, val_fraction=0)
    ds = BagDataset(index, s, tokenizer)
    a = [b for _, b in zip(range(3), make_loader(ds, BagStreamSampler(len(ds), 2), num_workers=0))]
    b = [b for _, b in zip(range(3), make_loader(ds, BagStreamSampler(len(ds), 2), num_workers=2))]
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_shuffle_window_keeps_bags_of_few_slides_together():
    groups = np.repeat(np.arange(12), 5)  # 12 slides x 5 bags
    for window in (1, 3):
        sampler = BagStreamSampler(60, 5, seed=2, groups=groups, window=window)
        epoch = [sampler.element(k)[1] for k in range(60)]
        assert sorted(epoch) == list(range(60))
        per_block = [set(groups[epoch[i : i + 5 * window]]) for i in range(0, 60, 5 * window)]
        assert all(len(block) == window for block in per_block)  # each window holds exactly W slides
    global_ = BagStreamSampler(60, 5, seed=2, groups=groups, window=0)
    assert max(len(set(groups[[global_.element(k)[1] for k in range(i, i + 5)]])) for i in range(0, 60, 5)) > 1
