"""Quad-tree geometry, parent selection and stable ids, on masks built in the test."""

import numpy as np
import pandas as pd
import pytest

from mrplip_core.wsi.hierarchy import (
    TilingError,
    TilingParams,
    box_fractions,
    build_manifest,
    integral_image,
    plan_for_slide,
    select_parents,
)


def _manifest(mask, downsample, slide_mpp=0.25, objective=40.0, width=None, height=None, **kw):
    params = TilingParams(**kw)
    width = width or int(mask.shape[1] * downsample)
    height = height or int(mask.shape[0] * downsample)
    plan = plan_for_slide("S", slide_mpp, objective, params)
    ii = integral_image(mask)
    parents = select_parents("S", width, height, plan.parent_size, ii, downsample, params)
    levels = {m: 0 for m in plan.magnifications}
    return build_manifest("S", slide_mpp, parents, plan, ii, downsample, levels, params.patch_px), plan


def test_parent_geometry_from_mpp_not_pyramid():
    p = TilingParams()
    assert plan_for_slide("a", 0.25, 40.0, p).parent_size == 4096  # 512 px at 2 um/px
    plan = plan_for_slide("b", 0.2525, 40.0, p)
    assert plan.parent_size % 8 == 0 and abs(plan.parent_size - 512 * 2 / 0.2525) <= 4
    assert plan_for_slide("c", 0.499, 20.0, p).parent_size == 2052  # 2052.1 px, a multiple of 4


def test_missing_magnification_skip_or_fail():
    plan = plan_for_slide("s20", 0.5, 20.0, TilingParams())
    assert plan.magnifications == (5.0, 10.0, 20.0) and plan.skipped == (40.0,)
    with pytest.raises(TilingError, match=r"'s20'.*20x.*below 40x"):
        plan_for_slide("s20", 0.5, 20.0, TilingParams(missing_magnification="fail"))
    with pytest.raises(TilingError, match="below the parent magnification"):
        plan_for_slide("s2", 4.0, 2.5, TilingParams())


def test_magnifications_must_be_power_of_two_chain():
    with pytest.raises(TilingError, match="power of two"):
        TilingParams(magnifications=(5, 15))
    with pytest.raises(TilingError, match="increasing"):
        TilingParams(magnifications=(10, 5))
    assert TilingParams(magnifications=(5, 20)).magnifications == (5.0, 20.0)


def test_every_parent_has_4_16_64_children_tiling_it_exactly():
    mask = np.ones((64, 64), bool)  # 64 mask px x 256 level-0 px = 16384 px of tissue
    df, plan = _manifest(mask, 256.0, n_parents=3, seed=1)
    parents = df[df.depth == 0]
    assert len(parents) == 3 and len(df) == 3 * 85
    for _, p in parents.iterrows():
        bag = df[df.bag_id == p.patch_id]
        for depth, n in ((1, 4), (2, 16), (3, 64)):
            kids = bag[bag.depth == depth]
            assert len(kids) == n
            side = p["size"] // 2**depth
            assert (kids["size"] == side).all()
            cells = {((x - p.x) // side, (y - p.y) // side) for x, y in zip(kids.x, kids.y)}
            assert cells == {(i, j) for i in range(2**depth) for j in range(2**depth)}
            assert ((kids.x - p.x) % side == 0).all() and ((kids.y - p.y) % side == 0).all()
        # each child's parent_id names the patch one magnification down that contains it
        by_id = bag.set_index("patch_id")
        for _, c in bag[bag.depth > 0].iterrows():
            up = by_id.loc[c.parent_id]
            assert up.depth == c.depth - 1
            assert up.x <= c.x < up.x + up["size"] and up.y <= c.y < up.y + up["size"]
            assert c["size"] * 2 == up["size"]
    assert df.patch_id.is_unique
    assert set(df.magnification) == {5.0, 10.0, 20.0, 40.0}
    assert np.allclose(df.mpp, 10.0 / df.magnification)


def test_ids_are_stable_and_selection_seeded_per_slide():
    mask = np.ones((64, 64), bool)
    a, _ = _manifest(mask, 256.0, n_parents=4, seed=7)
    b, _ = _manifest(mask, 256.0, n_parents=4, seed=7)
    pd.testing.assert_frame_equal(a, b)
    c, _ = _manifest(mask, 256.0, n_parents=4, seed=8)
    assert set(a.bag_id) != set(c.bag_id)


def test_min_tissue_fraction_and_most_tissue_selection():
    mask = np.zeros((32, 32), bool)  # 8192 level-0 px at 256 px per mask px: 2x2 parents of 4096
    mask[:16, :16] = True  # top-left parent fully tissue
    mask[16:, 16:24] = True  # bottom-right parent half tissue
    df, _ = _manifest(mask, 256.0, min_tissue_fraction=0.4, selection="most_tissue", n_parents=1)
    parents = df[df.depth == 0]
    assert list(zip(parents.x, parents.y)) == [(0, 0)]
    df_all, _ = _manifest(mask, 256.0, min_tissue_fraction=0.4, selection="all")
    parents = df_all[df_all.depth == 0].set_index("patch_id")
    assert sorted(parents.tissue_fraction.round(3)) == [0.5, 1.0]
    # the half-tissue parent's 10x children: two are tissue, two are glass
    half = df_all[(df_all.depth == 1) & (df_all.bag_id == "S_5x_x4096_y4096")]
    assert sorted(half.tissue_fraction.round(3)) == [0.0, 0.0, 1.0, 1.0]


def test_no_tissue_gives_an_empty_manifest_with_schema():
    df, _ = _manifest(np.zeros((32, 32), bool), 256.0)
    assert df.empty and "patch_id" in df.columns and str(df["x"].dtype) == "int64"


def test_box_fractions_counts_partial_boxes_outside_as_background():
    mask = np.ones((4, 4), bool)
    ii = integral_image(mask)
    f = box_fractions(ii, np.array([0, 2]), np.array([0, 2]), 4, 1.0)
    assert f.tolist() == [1.0, 0.25]
