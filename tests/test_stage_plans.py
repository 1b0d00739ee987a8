"""The stage plans (what each stage runs, what reruns it, its job unit) and the workflow they make.

Unit tests of the plans, then Snakemake itself: a dry run over a finished (touched) demo
workdir for the rerun semantics, and a real tiles run in shards of two slides.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from test_features_workflow import snakemake

from mrplip_core.captions.plan import CaptionsPlan
from mrplip_core.features.plan import FeaturesPlan
from mrplip_core.jobs import read_sections, settings_json, shard_slides, shards_holding, write_shard_marker
from mrplip_core.train.plan import PretrainPlan
from mrplip_core.wsi.plan import TilesPlan

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def with_(section: str, **changes) -> dict:
    return {**CONFIG, section: {**CONFIG[section], **changes}}


def test_the_plans_trigger_leaves_out_the_job_unit_but_not_the_settings() -> None:
    base = TilesPlan.from_config(CONFIG)
    sharded = TilesPlan.from_config(with_("wsi", slides_per_job=50))
    assert base.per_slide and not sharded.per_slide
    assert sharded.trigger == base.trigger  # cutting jobs differently does not change a tile
    assert TilesPlan.from_config(with_("tiling", n_parents=5)).trigger != base.trigger
    assert sharded.shards([f"s{i}" for i in range(120)])[-1] == [f"s{i}" for i in range(100, 120)]
    # the verb gets the sections keyed by name, the job unit included
    assert json.loads(sharded.settings_arg)["wsi"]["slides_per_job"] == 50


def test_caption_and_feature_triggers_ignore_tuning() -> None:
    captions = CaptionsPlan.from_config(CONFIG)
    tuned = CaptionsPlan.from_config(with_("captions", io_threads=1, slides_per_job=20))
    assert tuned.trigger == captions.trigger and tuned.keywords_trigger == captions.keywords_trigger
    features = FeaturesPlan.from_config(CONFIG)
    tuned = FeaturesPlan.from_config(with_("features", batch_size=7, num_workers=1, slides_per_job=20))
    assert tuned.image_trigger() == features.image_trigger()
    pyramid = FeaturesPlan.from_config(with_("features", read="pyramid"))
    assert pyramid.image_trigger() != features.image_trigger()
    # weights given for another encoder (a baseline) do not touch this encoder's features
    other = FeaturesPlan.from_config(with_("features", weights={"conch": "/models/conch.bin"}))
    assert other.image_trigger() == features.image_trigger() and other.image_trigger("conch") != features.image_trigger("conch")
    assert pyramid.text_trigger("minilm") == features.text_trigger("minilm")  # text does not read pixels


def test_unknown_encoders_are_named_before_any_job() -> None:
    with pytest.raises(ValueError, match=r"features.image_encoder: 'unii' is not a registered image encoder"):
        FeaturesPlan.from_config(with_("features", image_encoder="unii"))
    with pytest.raises(ValueError, match=r"features.weights: unknown encoder name\(s\) \['nope'\]"):
        FeaturesPlan.from_config(with_("features", weights={"nope": "/x"}))


def test_every_run_is_resolved_once_with_the_features_it_trains_on() -> None:
    config = {**with_("features", image_encoder="uni"), "ablations": {"no-mrtva": {"loss": {"weights": {"mrtva": 0.0}}}}}
    plan = PretrainPlan.from_config(config, results="res")
    assert list(plan.runs) == [CONFIG["pretrain"]["run"], "no-mrtva"] and plan.ablations == ["no-mrtva"]
    assert plan.run_encoders == {CONFIG["pretrain"]["run"]: "uni", "no-mrtva": "uni"}
    section = json.loads(plan.runs["no-mrtva"].settings_arg)["pretrain"]
    assert section["loss"]["weights"]["mrtva"] == 0.0 and section["data"]["results"] == "res"

    def refuse(section):
        raise ValueError("train.steps: -1 is less than the minimum of 1")

    with pytest.raises(ValueError, match="config ablations.no-mrtva: .* train.steps"):
        PretrainPlan.from_config(config, results="res", check=refuse)
    # a run cannot quietly train on other features than its name says
    with pytest.raises(ValueError, match="config ablations.on-conch: data.image_encoder cannot be changed"):
        PretrainPlan.from_config({**config, "ablations": {"on-conch": {"data": {"image_encoder": "conch"}}}},
                                 results="res")


def test_settings_are_one_json_object_keyed_by_section(tmp_path: Path) -> None:
    text = settings_json({"features": {"a": 1}, "failures_fatal": False, "other": 3}, "features", "failures_fatal")
    assert read_sections(text, "features", "failures_fatal", verb="features") == {
        "features": {"a": 1}, "failures_fatal": False}
    with pytest.raises(ValueError, match=r"mrplip features: --settings lacks the config section\(s\) \['features'\]"):
        read_sections('{"a": 1}', "features", verb="features")
    assert shards_holding(["c", "e"], shard_slides(list("abcde"), 2)) == [1, 2]
    marker = write_shard_marker(tmp_path / "m" / "shard_0.json", "tiles", ["a", "b"])
    assert json.loads(marker.read_text())["slides"] == ["a", "b"] and not list(marker.parent.glob(".*tmp"))


# -- Snakemake --------------------------------------------------------------------------------

def planned_rules(out: str) -> set[str]:
    return set(re.findall(r"^rule (\w+):", out, re.M)) - {"all", "tiles", "captions", "features", "evaluate"}


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory) -> Path:
    """The demo workdir as if the whole default target had run: every file a placeholder, every
    job's params recorded by `snakemake --touch`."""
    wd = tmp_path_factory.mktemp("finished_demo")
    shutil.copy(REPO / "config.yaml", wd / "config.yaml")
    (wd / "demo").mkdir()
    shutil.copy(REPO / "demo" / "slides.tsv", wd / "demo" / "slides.tsv")
    summary = snakemake(wd, "-n", "--summary")
    for f in [line.split("\t", 1)[0] for line in summary.splitlines()[1:] if "\t" in line]:
        (wd / f).parent.mkdir(parents=True, exist_ok=True)
        (wd / f).touch()
        os.utime(wd / f, (1_700_000_000, 1_700_000_000))
    snakemake(wd, "--touch", "--forceall")
    assert "Nothing to be done" in snakemake(wd, "-n")
    return wd


def test_a_new_image_encoder_reruns_features_both_trainings_and_evaluation_only(finished_demo: Path) -> None:
    (finished_demo / "overlay.yaml").write_text(yaml.safe_dump({"features": {"image_encoder": "quiltnet"}}))
    out = snakemake(finished_demo, "-n", "--configfile", str(finished_demo / "config.yaml"), str(finished_demo / "overlay.yaml"))
    rules = planned_rules(out)
    assert {"features_slide", "pretrain", "pretrain_ablation", "pathflip", "eval_retrieval", "eval_slides",
            "html_report"} <= rules, rules
    assert not rules & {"demo_slide", "tiles_slide", "slides_table", "captions_slide", "keywords_slide",
                        "text_features_slide"}, rules
    assert all(r.startswith(("features_", "pretrain", "pathflip", "eval_", "html_")) for r in rules), rules


def test_tiles_in_shards_write_a_marker_and_rebuild_a_deleted_slide(tmp_path: Path) -> None:
    from test_workflow import make_workdir

    wd = make_workdir(tmp_path, [("synthetic_40x", "demo/synthetic_40x.tiff", ""),
                                 ("copy_40x", "demo/synthetic_40x.tiff", "")], wsi={"thumbnail_mpp": 8.0, "slides_per_job": 2})
    out = snakemake(wd, "tiles")
    assert "tiles_shard_0" in out and "tiles_slide" not in out
    marker = json.loads((wd / "results" / "tiles" / ".shards" / "shard_0.json").read_text())
    assert marker["slides"] == ["synthetic_40x", "copy_40x"]
    assert "Nothing to be done" in snakemake(wd, "-n", "tiles")
    tile = wd / "results" / "tiles" / "copy_40x.parquet"
    before = tile.read_bytes()
    tile.unlink()  # rerunning one slide: delete its file, run the target again
    plan = snakemake(wd, "-n", "tiles")
    assert re.search(r"rule tiles_shard_0:.*?Missing output files: results/tiles/copy_40x.parquet", plan, re.S), plan
    snakemake(wd, "tiles")
    assert tile.read_bytes() == before
    assert "Nothing to be done" in snakemake(wd, "-n", "tiles")
