"""bench/ablation.yaml, the ablation a user runs on their own cohort
(`snakemake --configfile config.yaml bench/ablation.yaml -- evaluate`): 4 rows x 3 seeds of
pretraining runs that differ from the full run only in what each row changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mrplip_core.train.ablations import expand_runs, merged
from mrplip_core.wsi.planted import ARCHITECTURE_KINDS, KINDS

REPO = Path(__file__).resolve().parents[1]
ABLATION = REPO / "bench" / "ablation.yaml"


def _runs() -> dict[str, dict]:
    cfg = merged({**yaml.safe_load((REPO / "config.yaml").read_text()), "ablations": {}},
                 yaml.safe_load(ABLATION.read_text()))
    return expand_runs(cfg["pretrain"], cfg["ablations"])


def _diff(a: dict, b: dict, where: str = "") -> dict[str, tuple]:
    out = {}
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_diff(x, y, f"{where}{k}."))
        elif x != y:
            out[f"{where}{k}"] = (x, y)
    return out


def test_rows_differ_from_the_full_run_only_in_what_they_ablate():
    runs = _runs()
    assert sorted(runs) == sorted(f"{row}-s{s}" for row in ("full", "single-20x", "no-mrtva", "no-cvta")
                                  for s in (0, 1, 2))
    for s in (0, 1, 2):
        full = runs[f"full-s{s}"]
        assert full["seed"] == s and full["data"]["val_fraction"] == 0.25
        assert _diff(full, runs[f"single-20x-s{s}"]) == {
            "data.magnifications": ([5, 10, 20, 40], [20.0]),
            "data.patches_per_magnification": ([1, 2, 2, 2], [7]),  # as many patches per bag
            "run": (f"full-s{s}", f"single-20x-s{s}")}
        assert _diff(full, runs[f"no-mrtva-s{s}"]) == {"loss.weights.mrtva": (1.0, 0.0),
                                                       "run": (f"full-s{s}", f"no-mrtva-s{s}")}
        assert _diff(full, runs[f"no-cvta-s{s}"]) == {"loss.weights.cvta": (1.0, 0.0),
                                                      "run": (f"full-s{s}", f"no-cvta-s{s}")}


def test_the_users_command_plans_every_run_and_its_evaluation(tmp_path):
    """The command of the yaml's header, dry run on the demo config: 12 pretraining jobs."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text().replace(
        "ablations:  # real", "ablations: {}  # real").replace("\n  no-mrtva: {loss: {weights: {mrtva: 0.0}}}\n", "\n"))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "slides.tsv").write_text((REPO / "demo" / "slides.tsv").read_text())
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(tmp_path),
           "--cores", "1", "-n", "--configfile", str(tmp_path / "config.yaml"), str(ABLATION), "--", "evaluate"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    stats = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
             if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert stats["pretrain"] + stats["pretrain_ablation"] == 12, out[-3000:]
    assert stats["eval_retrieval"] == 12


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_ablation", REPO / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_bench_gives_20x_only_rows_as_many_patches_as_its_cohorts_full_run(tmp_path):
    """bench/ablation.py on a 40x cohort (5/10/20/40x, 1 + 2 + 2 + 2 patches) and a 20x one
    (5/10/20x, 1 + 2 + 2): the 20x-only rows draw 7 and 5 patches per bag."""
    from mrplip_core.pathflip.planted import CohortFiles, cohort_config, config_overrides

    bench = _bench()
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    for palette, per_bag in (("architecture", 7), ("tissue", 5)):
        cohort = bench.COHORTS[palette]
        files = CohortFiles(tmp_path / palette)
        files.root.mkdir()
        files.config.write_text(yaml.safe_dump(cohort_config(base, config_overrides(cohort.mpp))))
        cfg = bench.bench_config(files.root, 3, cohort)
        runs = expand_runs(cfg["pretrain"], cfg["ablations"])
        assert len(runs) == 12 and cfg["pretrain"]["train"]["steps"] == 3
        assert sum(runs["full-s0"]["data"]["patches_per_magnification"]) == per_bag
        for s in (0, 1, 2):
            assert runs[f"single-20x-s{s}"]["data"]["patches_per_magnification"] == [per_bag], palette
        held = cfg["evaluation"]["datasets"]["heldout"]
        assert held["prompts"].endswith(cohort.prompts) and Path(held["prompts"]).is_file()
        prompts = json.loads(Path(held["prompts"]).read_text())
        kinds = ARCHITECTURE_KINDS if palette == "architecture" else KINDS
        assert set(prompts["classes"]) == set(kinds)  # a prompt set per planted kind, no more


def test_the_bench_stops_on_a_workdir_cohort_of_the_other_palette(tmp_path):
    """A rerun with another --palette in the same --workdir would score one palette's slides with
    the other's prompts: the bench names the cohort and stops instead."""
    bench = _bench()
    table = tmp_path / "slides.tsv"
    table.write_text("slide_id\tpath\tmpp\tkinds\nplanted_000\twsi/p.tiff\t0.5\ttumour,stroma\n")
    bench.check_reused(table, "tissue")  # the tissue palette's kinds at its 0.5 um/px: reused
    with pytest.raises(SystemExit, match=r"slides.tsv: this cohort \(\['stroma', 'tumour'\] at \[0.5\] um/px\) "
                                         r"is not the architecture palette's"):
        bench.check_reused(table, "architecture")
    table.write_text("slide_id\tpath\tmpp\tkinds\nplanted_000\twsi/p.tiff\t0.25\ttumour,stroma\n")
    with pytest.raises(SystemExit, match="tissue palette's"):  # right kinds, wrong scan
        bench.check_reused(table, "tissue")
