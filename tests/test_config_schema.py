"""The config schema read from Python: `--config` values get the schema's types, both in
the library function and in a real `snakemake -n --config ...` run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mrplip_core.config_schema import apply_schema_types, check_section, load_schema, section_schema

REPO = Path(__file__).resolve().parents[1]


def test_strings_become_the_schema_types():
    schema = load_schema()
    # what Snakemake's --config parser hands over: nested scalars are strings
    given = {
        "failures_fatal": "true",
        "mpp_fallback": "null",
        "slides": "123",
        "wsi": {"thumbnail_mpp": "4.5"},
        "tiling": {"n_parents": "5", "magnifications": ["5", "10"], "selection": "all", "seed": ""},
        "tissue": {"threshold": "30", "work_mpp": "~", "fill_holes": "yes", "pen_margin_um": "1e2"},
        "features": {"image_encoder": "123", "weights": {"uni": "007"}, "num_workers": "null"},
        "captions": {"openai": {"server": {"env": {"VLLM_CPU_KVCACHE_SPACE": "4"}}}, "model": "null"},
        "evaluation": {"runs": "[demo, no-mrtva]", "few_shot": {"shots": "[1, 2]"}},
        "pretrain": {"optim": {"betas": ["0.9", "0.95"]}, "loss": {"weights": "{plm: 0}"}},
    }
    typed = apply_schema_types(given, schema)
    assert typed["failures_fatal"] is True and typed["mpp_fallback"] is None
    assert typed["wsi"]["thumbnail_mpp"] == 4.5
    assert typed["tiling"]["n_parents"] == 5 and typed["tiling"]["magnifications"] == [5, 10]
    assert typed["tissue"]["threshold"] == 30 and typed["tissue"]["work_mpp"] is None
    assert typed["tissue"]["fill_holes"] is True and typed["tissue"]["pen_margin_um"] == 100.0
    assert typed["features"]["num_workers"] is None and typed["captions"]["model"] is None
    assert typed["evaluation"]["runs"] == ["demo", "no-mrtva"] and typed["evaluation"]["few_shot"]["shots"] == [1, 2]
    assert typed["pretrain"]["optim"]["betas"] == [0.9, 0.95] and typed["pretrain"]["loss"]["weights"] == {"plm": 0}
    # genuine strings stay strings, whatever they look like
    assert typed["slides"] == "123" and typed["features"]["image_encoder"] == "123"
    assert typed["features"]["weights"] == {"uni": "007"} and typed["tiling"]["selection"] == "all"
    assert typed["captions"]["openai"]["server"]["env"] == {"VLLM_CPU_KVCACHE_SPACE": "4"}
    assert apply_schema_types({"tissue": {"threshold": "otsu"}}, schema)["tissue"]["threshold"] == "otsu"
    # an integer key given an empty value is not null: it stays for the validator to reject
    assert typed["tiling"]["seed"] == ""
    assert given["tiling"]["n_parents"] == "5"  # the input is not modified


def test_strings_of_no_allowed_type_are_left_for_the_validator():
    schema = load_schema()
    typed = apply_schema_types({"tiling": {"n_parents": "five", "patch_px": "5.5"}, "failures_fatal": "maybe"}, schema)
    assert typed == {"tiling": {"n_parents": "five", "patch_px": "5.5"}, "failures_fatal": "maybe"}
    with pytest.raises(ValueError, match=r"^tiling\.n_parents: 'five' is not of type 'integer'"):
        check_section({"n_parents": "five"}, section_schema("tiling"), "tiling")


def test_check_section_fills_defaults_and_names_the_key():
    tiling = check_section({"n_parents": "5"}, section_schema("tiling"), "tiling")
    assert tiling["n_parents"] == 5 and tiling["patch_px"] == 512 and tiling["magnifications"] == [5, 10, 20, 40]
    with pytest.raises(ValueError, match=r"tiling: .*'n_parent'"):
        check_section({"n_parent": 3}, section_schema("tiling"), "tiling")
    pretrain = check_section({"train": {"steps": "3"}}, section_schema("pretrain"), "pretrain")
    assert pretrain["train"]["steps"] == 3 and pretrain["loss"]["weights"]["mrtva"] == 1.0
    with pytest.raises(ValueError, match=r"^pretrain\.train: .*'stepz'"):
        check_section({"train": {"stepz": 3}}, section_schema("pretrain"), "pretrain")
    again = check_section({}, section_schema("tiling"), "tiling")
    again["magnifications"].append(80)  # defaults are copies, not the schema's own lists
    assert section_schema("tiling")["properties"]["magnifications"]["default"][-1] == 40


def _dry_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir),
           "--cores", "1", "-n", "-p", *args]  # -p: the shell commands, with the settings JSON
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.fixture()
def workdir(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "slides.tsv").write_text((REPO / "demo" / "slides.tsv").read_text())
    return tmp_path


def test_command_line_config_values_reach_the_rules_typed(workdir):
    """The form config.yaml's header documents, plus a float, a boolean, null and a list."""
    proc = _dry_run(workdir, "--config", "tiling={n_parents: 5, magnifications: [5, 10]}", "failures_fatal=true",
                    "mpp_fallback=null", "wsi={thumbnail_mpp: 4.5}", "tissue={fill_holes: true, work_mpp: null}",
                    "--", "tiles")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the tiles jobs receive the resolved settings as JSON (a params rerun trigger)
    settings = json.loads(re.search(r"--settings '(\{.*?\})'", proc.stdout).group(1))
    assert settings["tiling"]["n_parents"] == 5 and settings["tiling"]["magnifications"] == [5, 10]
    assert settings["wsi"]["thumbnail_mpp"] == 4.5 and settings["failures_fatal"] is True
    assert settings["mpp_fallback"] is None and settings["tissue"]["work_mpp"] is None
    assert settings["tissue"]["fill_holes"] is True and settings["tiling"]["patch_px"] == 512  # the rest: config.yaml
    header = (REPO / "config.yaml").read_text().split("\n\n", 1)[0]
    assert "--config tiling='{n_parents: 5}'" in header


def test_a_wrong_command_line_value_fails_naming_the_key(workdir):
    proc = _dry_run(workdir, "--config", "tiling={n_parents: five}", "--", "tiles")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "'five' is not of type 'integer'" in text and "['tiling']['n_parents']" in text
    assert not (workdir / "results").exists()


def test_an_ablation_from_the_command_line_is_typed_and_checked(workdir):
    target = "results/pretrain/short/model.safetensors"
    proc = _dry_run(workdir, "--config", "ablations={short: {train: {steps: 3}, loss: {weights: {mrtva: 0}}}}",
                    "--", target)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    settings = json.loads(re.search(r"--settings '(\{.*?\})' --run-dir results/pretrain/short", proc.stdout).group(1))
    settings = settings["pretrain"]  # keyed by config section, like every verb's --settings
    assert settings["train"]["steps"] == 3 and settings["loss"]["weights"]["mrtva"] == 0
    assert settings["train"]["log_every"] == 1  # the rest: the main pretrain section
    proc = _dry_run(workdir, "--config", "ablations={short: {train: {steps: three}}}", "--", target)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ablations.short" in text and "pretrain.train.steps: 'three'" in text
