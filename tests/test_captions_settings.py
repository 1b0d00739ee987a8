"""The captions config section: schema defaults, dataclass defaults and config.yaml agree."""

from __future__ import annotations

import copy

import pytest
import yaml
from snakemake.utils import validate

from mrplip_core.captions.settings import PAPER_PROMPT, CaptionSettings


@pytest.fixture(scope="module")
def schema(repo_root):
    return str(repo_root / "workflow" / "schemas" / "config.schema.yaml")


def test_schema_defaults_equal_dataclass_defaults(schema):
    cfg = {"slides": "x.tsv"}
    validate(cfg, schema)  # fills defaults
    assert CaptionSettings.from_dict(cfg["captions"]).to_dict() == CaptionSettings().to_dict()


def test_config_yaml_captions_section_is_the_default(repo_root, schema):
    cfg = yaml.safe_load((repo_root / "config.yaml").read_text())
    validate(cfg, schema)
    assert CaptionSettings.from_dict(cfg["captions"]).to_dict() == CaptionSettings().to_dict()
    assert cfg["captions"]["backend"] == "morphology"  # the offline default


def test_invalid_keys_fail_naming_them(schema):
    with pytest.raises(Exception, match="concurency"):
        validate({"slides": "x", "captions": {"openai": {"concurency": 3}}}, schema)
    with pytest.raises(Exception, match="backend|llava"):
        validate({"slides": "x", "captions": {"backend": "llava"}}, schema)
    with pytest.raises(ValueError, match=r"captions\.openai.*concurency"):
        CaptionSettings.from_dict({"openai": {"concurency": 3}})
    with pytest.raises(ValueError, match="needs captions.model"):
        CaptionSettings.from_dict({"backend": "transformers"})


def test_prompt_per_magnification():
    s = CaptionSettings()
    assert s.prompt_for(5.0).startswith("Can you describe the main features")
    assert "architecture" in s.prompt_for(5) and "architecture" in s.prompt_for(10)
    assert "cells" in s.prompt_for(20) and "nuclear" in s.prompt_for(40)
    assert s.prompt_for(2.5) == PAPER_PROMPT  # no entry: the paper's prompt


def test_digest_tracks_what_changes_a_caption():
    base = CaptionSettings.from_dict({"backend": "openai", "model": "m"})
    d = base.to_dict()
    tuned = copy.deepcopy(d)
    tuned["openai"]["concurrency"] = 8
    tuned["io_threads"] = 1
    tuned["flush_rows"] = 3
    assert CaptionSettings.from_dict(tuned).digest() == base.digest()
    for change in ({"generation": {"max_tokens": 5}}, {"prompts": {"default": "x"}}, {"model": "other"},
                   {"image": {"format": "png"}}, {"image": {"jpeg_quality": 80}}):
        assert CaptionSettings.from_dict({**d, **change}).digest() != base.digest(), change
    # the morphology captioner reads pixels: request and language-model settings change nothing,
    # the prompt (recorded in every row) does
    morph = CaptionSettings().digest()
    for change in ({"generation": {"max_tokens": 5}}, {"image": {"format": "png"}}, {"model": "m"}):
        assert CaptionSettings.from_dict(change).digest() == morph, change
    assert CaptionSettings.from_dict({"prompts": {"default": "x"}}).digest() != morph


def test_gpus_follow_where_the_model_runs():
    assert CaptionSettings().job_gpus == 0  # morphology
    assert CaptionSettings.from_dict({"backend": "openai", "model": "m"}).job_gpus == 1  # server started by the job
    assert CaptionSettings.from_dict({"backend": "openai", "openai": {"base_url": "http://gpu:8000/v1"}}).job_gpus == 0
    assert CaptionSettings.from_dict({"backend": "transformers", "model": "m",
                                      "transformers": {"device": "cpu"}}).job_gpus == 0
    assert CaptionSettings.from_dict({"backend": "openai", "model": "m", "gpus": 4}).job_gpus == 4
