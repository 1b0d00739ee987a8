"""Ablation runs: the pretrain section with a few keys changed, named, validated."""

from __future__ import annotations

import pytest

from mrplip_core.train.ablations import expand_runs, merged

PRETRAIN = {
    "run": "demo",
    "loss": {"weights": {"itc": 1.0, "mrtva": 1.0}},
    "data": {"magnifications": [5, 10, 20, 40], "patches_per_magnification": [1, 2, 2, 2]},
}


def test_an_ablation_changes_only_the_keys_it_names():
    runs = expand_runs(PRETRAIN, {"no-mrtva": {"loss": {"weights": {"mrtva": 0.0}}},
                                  "single-res": {"data": {"magnifications": [20.0], "patches_per_magnification": [8]}}})
    assert list(runs) == ["demo", "no-mrtva", "single-res"]
    assert runs["no-mrtva"]["run"] == "no-mrtva"
    assert runs["no-mrtva"]["loss"]["weights"] == {"itc": 1.0, "mrtva": 0.0}
    assert runs["no-mrtva"]["data"] == PRETRAIN["data"]
    # lists replace, they do not merge
    assert runs["single-res"]["data"] == {"magnifications": [20.0], "patches_per_magnification": [8]}
    assert runs["demo"] == PRETRAIN
    assert PRETRAIN["loss"]["weights"]["mrtva"] == 1.0  # the input is not modified


def test_no_ablations_is_the_main_run_alone():
    assert list(expand_runs(PRETRAIN, None)) == ["demo"]
    assert list(expand_runs(PRETRAIN, {})) == ["demo"]


@pytest.mark.parametrize(("ablations", "message"), [
    ({"demo": {}}, r"ablations\.demo: the name is pretrain\.run's"),
    ({"x": {"run": "y"}}, r"ablations\.x: 'run' cannot be changed"),
    ({"bad name": {}}, r"ablations\.bad name: a run name"),
    ({"x": [1, 2]}, r"ablations\.x: expected a mapping"),
    ({"x": {"resources": {"mem_mb": 1}}}, r"ablations\.x: 'resources' cannot be changed"),
])
def test_a_bad_ablation_is_an_error_naming_it(ablations, message):
    with pytest.raises(ValueError, match=message):
        expand_runs(PRETRAIN, ablations)


def test_merged_keeps_base_keys_absent_from_changes():
    assert merged({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 5}}) == {"a": {"b": 1, "c": 5}, "d": 3}
