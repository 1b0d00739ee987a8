"""The Slurm profiles: what they make Snakemake ask Slurm for, and real runs on a local Slurm.

Fast tests (no Slurm needed):
- both profiles load and plan the workflow; entries for rules that do not exist yet are
  ignored; `--profile slurm` works after the documented symlink step;
- profiles/slurm turned into sbatch command lines by the real executor plugin, with stub
  Slurm commands on PATH that record each sbatch call: GPU flags, multi-node geometry,
  grouping and the doubled memory of the retry (also of the real workflow's encoder jobs);
- profiles/slurm-local differs from profiles/slurm only where this machine needs it.

Slow tests (`pytest -m slow`; they start the local cluster of scripts/slurm-local, which
needs root, and stop it afterwards; skipped without root unless MRPLIP_REQUIRE_SLURM=1):
- the tiles stage through Slurm gives the same outputs as `--cores 2`;
- a slide that fails (failures_fatal: true) fails its Slurm job, the rest of the run goes
  on, and after the input is fixed a rerun runs only what is missing;
- the multi-node pretraining pattern: one torchrun per node with a c10d rendezvous on the
  first node, on a real two-node allocation.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"
SLURM_LOCAL = REPO / "scripts" / "slurm-local"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# Small slides for the runs through Slurm: a 40x slide that yields one full visual bag
# (85 patches) and a 20x slide (its 40x level is skipped). Seconds per job, not minutes.
SMALL_DEMO = {
    "demo": [
        {"name": "synthetic_40x", "width": 8192, "height": 8192, "mpp": 0.25, "seed": 1},
        {"name": "synthetic_20x", "width": 4096, "height": 4096, "mpp": 0.5, "seed": 2},
    ]
}
TIMING_FIELDS = {"elapsed_s"}


# --- helpers ------------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    proc.output = proc.stdout + proc.stderr  # Snakemake logs to stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{proc.output[-6000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table (the first one printed): rule -> number of jobs."""
    block = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    block = block.split("\n\n", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", block, re.M) if m[1] != "total"}


def copy_workflow(dst: Path) -> Path:
    """The workflow as a user has it: workflow/, rules/, evaluation/ (prompt files), config.yaml and the slide table."""
    dst.mkdir(parents=True, exist_ok=True)
    for d in ("workflow", "rules", "evaluation"):
        shutil.copytree(REPO / d, dst / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "config.yaml", dst / "config.yaml")
    (dst / "demo").mkdir(exist_ok=True)
    shutil.copy(REPO / "demo" / "slides.tsv", dst / "demo" / "slides.tsv")
    return dst


def load_profile(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


# --- fast: the profiles as Snakemake reads them ---------------------------------------------


@pytest.mark.parametrize("profile", ["slurm", "slurm-local", "local"])
def test_profile_plans_the_workflow(tmp_path, profile):
    """Each profile loads and plans the default run; GPU entries for rules the workflow does
    not have yet are ignored; the Slurm profiles put the tiles jobs into one group."""
    wd = copy_workflow(tmp_path / "wf")
    shutil.copytree(PROFILES, wd / "profiles")
    # the command as the README gives it, from the top of the checkout
    proc = run([*SNAKEMAKE, "-n", "--profile", f"profiles/{profile}"], cwd=wd)
    assert f"Using profile profiles/{profile} " in proc.output
    assert job_counts(proc.output)["tiles_slide"] == 2
    if profile.startswith("slurm"):
        assert "Group job tiles" in proc.output
        # attempt 1 gets the base memory; the retry doubles it (checked with sbatch below)
        assert re.search(r"rule tiles_slide:(?:(?!\nrule ).)*mem_mb=2000,", proc.output, re.S)


def test_generated_shard_rules_get_the_profiles_gpu_entry(tmp_path):
    """captions/features.slides_per_job > 1 generate rules captions_shard_0, _1, ...; Snakemake's
    set-resources matches exact names, so without rules/common.smk's shard_rules
    they would be sent to the default partition without a GPU."""
    wd = copy_workflow(tmp_path / "wf")
    shutil.copytree(PROFILES, wd / "profiles")
    (wd / "shard.yaml").write_text(yaml.safe_dump({"captions": {"slides_per_job": 1000},
                                                   "features": {"slides_per_job": 1000}}))
    proc = run([*SNAKEMAKE, "-n", "--profile", "profiles/slurm", "--configfile", "config.yaml", "shard.yaml",
                "--", "captions", "features"], cwd=wd)
    jobs = re.findall(r"^rule ((?:captions|features)_shard_\d+):\n(?:(?!\nrule ).)*?resources: ([^\n]*)",
                      proc.output, re.S | re.M)
    assert sorted(name for name, _ in jobs) == ["captions_shard_0", "features_shard_0"], proc.output[-3000:]
    for name, resources in jobs:
        assert "slurm_partition=gpu" in resources and "gpu_model=h100" in resources, (name, resources)


@pytest.mark.parametrize("slides_per_job", [1, 1000])
def test_llm_subcaptions_jobs_go_to_the_gpu_partition_with_the_configs_sizes(tmp_path, slides_per_job):
    """With pathflip.subcaptions.method llm each job starts a language-model server: the profile
    sends those jobs (and not the rules-based ones) to the GPU partition, and does not replace the
    config's llm memory with the small CPU jobs' size."""
    wd = copy_workflow(tmp_path / "wf")
    shutil.copytree(PROFILES, wd / "profiles")
    llm = {"pathflip": {"subcaptions": {"method": "llm", "slides_per_job": slides_per_job,
                                        "llm": {"model": "/models/some-llm"}}}}
    (wd / "llm.yaml").write_text(yaml.safe_dump(llm))
    llm["pathflip"]["subcaptions"]["llm"]["openai"] = {"base_url": "http://llm.internal:8000/v1"}
    (wd / "remote.yaml").write_text(yaml.safe_dump(llm))
    planned = {}
    for extra in ("", "llm.yaml", "remote.yaml"):
        proc = run([*SNAKEMAKE, "-n", "--profile", "profiles/slurm", "--configfile", "config.yaml",
                    *([extra] if extra else []), "--", "subcaptions"], cwd=wd)
        planned[extra] = re.findall(r"^\s*rule (subcaptions_\w+):\n(?:(?!\n\s*(?:local)?rule ).)*?resources: ([^\n]*)",
                                    proc.output, re.S | re.M)
        assert planned[extra], proc.output[-3000:]
    llm_jobs = planned["llm.yaml"]
    # the rules, and llm on a running server (a client: no GPU), stay CPU jobs
    for name, res in planned[""] + planned["remote.yaml"]:
        assert not name.startswith("subcaptions_llm") and "gpu_model" not in res and "gpu=1" not in res, (name, res)
    for name, resources in llm_jobs:
        assert name.startswith("subcaptions_llm_slide" if slides_per_job == 1 else "subcaptions_llm_shard_"), name
        assert "slurm_partition=gpu" in resources and "gpu_model=h100" in resources, (name, resources)
        assert "gpu=1" in resources and "mem_mb=16000" in resources, (name, resources)


def test_profile_slurm_by_name_after_documented_step(tmp_path):
    """`snakemake --profile slurm` (the README's cluster command) works once profiles/slurm is
    linked into ~/.config/snakemake, as docs/cluster.md says; without the link it does not."""
    wd = copy_workflow(tmp_path / "wf")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_CONFIG_HOME", None)
    env.pop("SNAKEMAKE_PROFILE", None)
    cmd = [*SNAKEMAKE, "-n", "--profile", "slurm"]
    missing = run(cmd, cwd=wd, env=env, check=False)
    assert missing.returncode != 0 and "profile" in missing.output.lower()

    (home / ".config" / "snakemake").mkdir(parents=True)
    (home / ".config" / "snakemake" / "slurm").symlink_to(PROFILES / "slurm")  # the documented step
    found = run(cmd, cwd=wd, env=env)
    assert "Using profile slurm " in found.output
    assert "Group job tiles" in found.output


# The stub workflow: one rule per name the profile configures. Like the real rules, the
# GPU stages declare their own GPUs, memory and time (from config.yaml in the workflow);
# the CPU rules declare sizes that the profile must replace.
STUB_SNAKEFILE = textwrap.dedent(
    """
    SLIDES = ["s1", "s2", "s3"]

    rule all:
        input:
            "pretrain/done",
            "captions/s1.txt",
            expand("{stage}/{slide}.txt", stage=["tiles", "keywords", "features", "text_features"], slide=SLIDES),

    for stage in ["tiles", "keywords"]:
        rule:
            name: f"{stage}_slide"
            output: stage + "/{slide}.txt"
            log: "logs/" + stage + "/{slide}.log"
            threads: 1
            resources: mem_mb=100, runtime=5
            shell: "touch {output}"

    rule captions_slide:  # e.g. a tensor-parallel vLLM server: captions.gpus: 2
        output: "captions/{slide}.txt"
        log: "logs/captions/{slide}.log"
        threads: 4
        resources: mem_mb=8000, runtime=720, gpu=2
        shell: "touch {output}"

    for stage in ["features", "text_features"]:
        rule:
            name: f"{stage}_slide"
            output: stage + "/{slide}.txt"
            log: "logs/" + stage + "/{slide}.log"
            threads: 8
            resources: mem_mb=16000, runtime=60, gpu=1
            shell: "touch {output}"

    rule pretrain:  # pretrain.resources.gpus_per_node: 4
        output: "pretrain/done"
        log: "logs/pretrain.log"
        threads: 8
        resources: mem_mb=100, runtime=5, gpu=4
        shell: "touch {output}"
    """
)

STUB_SBATCH = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys
    with open(os.environ["SBATCH_RECORD"], "a") as fh:
        fh.write(json.dumps(sys.argv[1:]) + "\\n")
    print("sbatch: error: stub: submission refused by the test", file=sys.stderr)
    sys.exit(1)
    """
)
STUB_OUTPUTS = {  # what the other Slurm commands the plugin calls answer
    "sinfo": "PARTITION\ncpu*\ngpu\n",
    "scontrol": "MinJobAge = 300 sec\nMaxArraySize = 1001\n",
    "squeue": "", "sacct": "", "sacctmgr": "", "sshare": "", "scancel": "",
}


def sbatch_calls(tmp_path: Path, profile: Path, *extra: str, wd: Path | None = None) -> list[dict]:
    """Run the stub workflow (or the workflow in ``wd``) with `profile` and the real slurm
    executor; return one dict per sbatch call: rule (from the job comment), attempt, and the
    parsed options."""
    if wd is None:
        wd = tmp_path / "stubwf"
        (wd / "workflow").mkdir(parents=True)
        (wd / "workflow" / "Snakefile").write_text(STUB_SNAKEFILE)
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(STUB_SBATCH.format(python=sys.executable))
    for name, out in STUB_OUTPUTS.items():
        (bin_dir / name).write_text(f"#!/bin/sh\nprintf '%s' {shlex.quote(out)}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    record = tmp_path / "sbatch.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin",
           "SBATCH_RECORD": str(record)}
    for var in ("SLURM_CONF", "SNAKEMAKE_PROFILE", "SLURM_JOB_ID"):
        env.pop(var, None)
    # the first status check comes after 40 s by default, and Snakemake waits for it to exit
    proc = run([*SNAKEMAKE, "--profile", str(profile), "--slurm-init-seconds-before-status-checks", "1",
                *extra], cwd=wd, env=env, check=False, timeout=300)
    assert proc.returncode != 0, "every submission was refused, the run cannot succeed"
    assert record.exists(), f"sbatch was never called:\n{proc.output[-4000:]}"
    calls = []
    for line in record.read_text().splitlines():
        argv = json.loads(line)
        wrap = next(a for a in argv if a.startswith("--wrap="))
        opts = " ".join(a for a in argv if not a.startswith("--wrap="))
        comment = re.search(r"--comment (\S+)", opts)[1]
        rule = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", comment)[1]
        attempt = int(re.search(r"--attempt (\d+)", wrap)[1])
        calls.append({"rule": rule, "attempt": attempt, "opts": opts, "wrap": wrap})
    return calls


def flag(opts: str, name: str) -> str | None:
    """Value of an sbatch option in a command line (`--name=value`, `--name value`)."""
    m = re.search(rf"(?:^|\s){re.escape(name)}(?:=|\s+)(\S+)", opts)
    return m[1].strip("'") if m else None


@pytest.fixture(scope="module")
def slurm_profile_calls(tmp_path_factory):
    return sbatch_calls(tmp_path_factory.mktemp("sbatch"), PROFILES / "slurm")


def one_call(calls: list[dict], rule: str, attempt: int = 1) -> dict:
    found = [c for c in calls if c["rule"] == rule and c["attempt"] == attempt]
    assert len(found) == 1, f"{rule} attempt {attempt}: {len(found)} sbatch calls in {calls}"
    return found[0]


def test_sbatch_gpu_stage_takes_the_rules_gpus_as_one_process(slurm_profile_calls):
    opts = one_call(slurm_profile_calls, "captions_slide")["opts"]
    # where, from the profile
    assert flag(opts, "-p") == "gpu"
    assert flag(opts, "--cpus-per-gpu") == "8"
    # what, from the rule (config.yaml): 2 GPUs of the profile's model, its memory and time
    assert flag(opts, "--gpus") == "h100:2"
    assert flag(opts, "--mem") == "8000" and flag(opts, "-t") == "720"
    # tasks_per_gpu: 0 -> no --ntasks-per-gpu / --ntasks: ONE process with both GPUs
    assert "--ntasks-per-gpu" not in opts and flag(opts, "--ntasks") is None
    assert "--cpus-per-task" not in opts


def test_sbatch_encoder_jobs_share_one_gpu_per_group(slurm_profile_calls):
    for stage in ("features", "text_features"):
        call = one_call(slurm_profile_calls, f"{stage}_{stage}_slide")
        opts = call["opts"]
        assert all(f"{stage}_slide:slide=s{i}" in call["wrap"] for i in (1, 2, 3)), stage
        # the three slides run in turn on one GPU: 1 GPU, one job's memory, 3 x 60 min
        assert flag(opts, "--gpus") == "h100:1", stage
        assert flag(opts, "--mem") == "16000" and flag(opts, "-t") == "180", stage
        assert flag(opts, "-p") == "gpu" and flag(opts, "--cpus-per-gpu") == "8", stage


def test_sbatch_pretrain_spans_nodes_with_one_task_per_node(slurm_profile_calls):
    call = one_call(slurm_profile_calls, "pretrain")
    opts = call["opts"]
    assert flag(opts, "--nodes") == "2"
    assert flag(opts, "--ntasks") == "2"
    assert flag(opts, "--ntasks-per-node") == "1"
    assert flag(opts, "--gres") == "gpu:h100:4"  # per node: 8 GPUs in all
    assert flag(opts, "--cpus-per-gpu") == "8"
    assert flag(opts, "-p") == "gpu"
    assert flag(opts, "--mem") == "200000"
    # the rule's gpu=4 would add --gpus=4 (a job total) on top of --gres; tasks_per_gpu: 0,
    # else the plugin adds --ntasks-per-gpu=2 (tasks) and Slurm starts 8 tasks per node
    assert "--ntasks-per-gpu" not in opts and "--gpus" not in opts
    # --ntasks for a GPU job comes only from `mpi` being set: the job script then runs the
    # rule itself (no `srun -n1` around it), so the rule's own srun starts one torchrun per node


@pytest.mark.parametrize("stage", ["tiles", "keywords"])
def test_sbatch_cpu_jobs_go_in_groups(slurm_profile_calls, stage):
    call = one_call(slurm_profile_calls, f"{stage}_{stage}_slide")
    opts = call["opts"]
    assert all(f"{stage}_slide:slide=s{i}" in call["wrap"] for i in (1, 2, 3))
    # three one-thread jobs side by side (cores: 8 allows it): 3 CPUs, 3 x 2000 MB, 10 min
    assert flag(opts, "--cpus-per-task") == "3"
    assert flag(opts, "--mem") == "6000"
    assert flag(opts, "-t") == "10"
    assert flag(opts, "-p") == "cpu"  # CPU jobs: the cluster's default partition (sinfo)
    assert "--gpus" not in opts


def test_sbatch_retry_doubles_memory_and_time(slurm_profile_calls):
    first, retry = (one_call(slurm_profile_calls, "tiles_tiles_slide", a) for a in (1, 2))
    assert int(flag(retry["opts"], "--mem")) == 2 * int(flag(first["opts"], "--mem"))
    assert int(flag(retry["opts"], "-t")) == 2 * int(flag(first["opts"], "-t"))
    first, retry = (one_call(slurm_profile_calls, "pretrain", a) for a in (1, 2))
    assert int(flag(retry["opts"], "--mem")) == 2 * int(flag(first["opts"], "--mem"))
    assert not [c for c in slurm_profile_calls if c["attempt"] > 2], "retries: 1 means two attempts"


def test_sbatch_retry_doubles_memory_and_time_of_the_captions_jobs(tmp_path):
    """The same for the captions rule (captions.mem_mb, .runtime): its retry gets twice."""
    wd = copy_workflow(tmp_path / "wf")
    (wd / "overlay.yaml").write_text(yaml.safe_dump({"captions": {"mem_mb": 3000, "runtime": 7}}))
    config = ["--configfile", "config.yaml", "overlay.yaml"]
    summary = run([*SNAKEMAKE, "-n", "--summary", *config, "--", "captions"], cwd=wd).stdout
    for line in summary.splitlines()[1:]:
        path = line.split("\t", 1)[0]
        if not path.startswith(("results/captions/", "results/keywords/")):
            (wd / path).parent.mkdir(parents=True, exist_ok=True)
            (wd / path).touch()
            os.utime(wd / path, (1_700_000_000, 1_700_000_000))
    calls = sbatch_calls(tmp_path, PROFILES / "slurm", *config, "--", "captions", wd=wd)
    jobs = [c for c in calls if c["rule"] == "captions_slide"]  # one Slurm job per slide, each tried twice
    assert sorted(c["attempt"] for c in jobs) == [1, 1, 2, 2], calls
    for c in jobs:
        assert int(flag(c["opts"], "--mem")) == 3000 * c["attempt"] and int(flag(c["opts"], "-t")) == 7 * c["attempt"]


@pytest.mark.parametrize("slides_per_job", [1, 2])
def test_sbatch_retry_doubles_memory_and_time_of_the_feature_jobs(tmp_path, slides_per_job):
    """The encoder rules take mem_mb and runtime from config.yaml (features.mem_mb, .runtime),
    which the profile leaves alone, so the rules themselves grow them with the attempt: the
    real workflow, its inputs present as placeholders, submitted through the stub sbatch."""
    wd = copy_workflow(tmp_path / "wf")
    overlay = {"features": {"mem_mb": 3000, "runtime": 7, "slides_per_job": slides_per_job}}
    (wd / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    config = ["--configfile", "config.yaml", "overlay.yaml"]
    summary = run([*SNAKEMAKE, "-n", "--summary", *config, "--", "features"], cwd=wd).stdout
    for line in summary.splitlines()[1:]:  # the files of the target: all but the features exist
        path = line.split("\t", 1)[0]
        if not path.startswith(("results/features/", "results/text_features/")):
            (wd / path).parent.mkdir(parents=True, exist_ok=True)
            (wd / path).touch()
            os.utime(wd / path, (1_700_000_000, 1_700_000_000))  # one mtime: nothing upstream reruns
    calls = sbatch_calls(tmp_path, PROFILES / "slurm", *config, "--", "features", wd=wd)
    # features.slides_per_job is the job unit of both the image and the text feature jobs
    image, text = (("features_shard_0", "text_features_shard_0") if slides_per_job > 1
                   else ("features_features_slide", "text_features_text_features_slide"))
    assert {c["rule"] for c in calls} == {image, text}, calls
    for rule in (image, text):
        first, retry = (one_call(calls, rule, a) for a in (1, 2))
        # both slides in one Slurm job: one job's memory; a group runs its two jobs in turn
        # (twice the runtime), a shard is one job (features.runtime is per shard)
        runtime = 7 if "_shard_" in rule else 2 * 7
        assert int(flag(first["opts"], "--mem")) == 3000 and int(flag(first["opts"], "-t")) == runtime, rule
        assert int(flag(retry["opts"], "--mem")) == 2 * 3000, rule
        assert int(flag(retry["opts"], "-t")) == 2 * runtime, rule


# Keys in which the local test profile may differ from the cluster profile, and why.
LOCAL_DIFFERENCES = {
    ("slurm-status-command",): "no accounting database on the local cluster",
    ("slurm-init-seconds-before-status-checks",): "jobs take seconds there",
    ("slurm-keep-successful-logs",): "the tests count the Slurm logs",
    ("default-resources", "slurm_partition"): "the local partition is 'debug'",
    ("cores",): "a local node has one core",
}
LOCAL_RESOURCE_DIFFERENCES = {"slurm_partition", "gpu_model", "gres", "cpus_per_gpu", "mem_mb"}  # sizes, names


def _flatten(d: dict, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "set-resources":
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def test_local_profile_stays_in_step_with_the_cluster_profile():
    cluster, local = load_profile("slurm"), load_profile("slurm-local")
    flat_c, flat_l = _flatten(cluster), _flatten(local)
    for key in sorted(set(flat_c) | set(flat_l)):
        if key in LOCAL_DIFFERENCES or key == ("set-resources",):
            continue
        assert flat_c.get(key) == flat_l.get(key), f"profiles differ in {'.'.join(key)}"
    assert local["slurm-status-command"] == "squeue"
    res_c, res_l = cluster["set-resources"], local["set-resources"]
    assert res_c.keys() == res_l.keys()
    for rule in res_c:
        assert res_c[rule].keys() == res_l[rule].keys(), rule
        for key in res_c[rule]:
            if key not in LOCAL_RESOURCE_DIFFERENCES:
                assert res_c[rule][key] == res_l[rule][key], f"{rule}.{key}"
            if key == "mem_mb" and "attempt" in str(res_c[rule][key]):
                assert "attempt" in str(res_l[rule][key]), f"{rule}.mem_mb must grow on retry"


# --- slow: a real Slurm on this machine ----------------------------------------------------


@pytest.fixture(scope="session")
def slurm_env():
    """Start the local cluster (scripts/slurm-local), yield the environment that reaches it,
    stop it afterwards. A cluster that was already running is used and left running."""
    require = os.environ.get("MRPLIP_REQUIRE_SLURM") == "1"

    def unavailable(reason: str):
        if require:
            pytest.fail(f"{reason} (and MRPLIP_REQUIRE_SLURM=1)")
        pytest.skip(reason)

    if os.geteuid() != 0:
        unavailable("the local Slurm cluster needs root (slurmd runs as root)")
    installed = all(Path(p).exists() for p in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged"))
    if not installed and not shutil.which("apt-get"):
        unavailable("slurm-wlm is not installed and apt-get is not available")
    was_running = run([str(SLURM_LOCAL), "status"], cwd=REPO, check=False).returncode == 0
    started = run([str(SLURM_LOCAL), "start"], cwd=REPO, check=False, timeout=900)
    if started.returncode != 0:
        if not was_running:  # whatever part of it did start
            run([str(SLURM_LOCAL), "stop"], cwd=REPO, check=False)
        unavailable(f"scripts/slurm-local start failed ({started.returncode}):\n{started.output[-3000:]}")
    conf = re.search(r"export SLURM_CONF=(\S+)", started.output)[1]
    env = {**os.environ, "SLURM_CONF": conf}
    env.pop("SNAKEMAKE_PROFILE", None)
    try:
        yield env
    finally:
        if not was_running:
            stopped = run([str(SLURM_LOCAL), "stop"], cwd=REPO, check=False)
            assert stopped.returncode == 0, stopped.output


def slurm_jobs(env: dict, run_id: str) -> list[dict]:
    """The Slurm jobs of one Snakemake run (job name = run id), as Slurm reports them."""
    out = run(["squeue", "-h", "--states=all", f"--name={run_id}", "-o", "%i|%T|%k|%m|%D"],
              cwd=REPO, env=env).stdout
    jobs = []
    for line in out.splitlines():
        jobid, state, comment, mem, nodes = line.split("|")
        jobs.append({"id": jobid, "state": state, "comment": comment, "mem": mem, "nodes": nodes})
    return jobs


def run_id_of(output: str) -> str:
    return re.search(r"SLURM run ID: (\S+)", output)[1]


def snakemake_slurm(wd: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([*SNAKEMAKE, *args, "--profile", str(PROFILES / "slurm-local")], cwd=wd, env=env,
               check=check, timeout=600)


def _normalise(obj, root: Path):
    """A record or table cell with the run's folder replaced and timing fields dropped."""
    if isinstance(obj, dict):
        return {k: _normalise(v, root) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [_normalise(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(root), "<run>")
    return obj


def assert_same_outputs(a: Path, b: Path, slide_ids: list[str]) -> None:
    """Outputs of the tiles stage in two run folders are the same, timing fields aside."""
    for sid in slide_ids:
        ta = pd.read_parquet(a / "results" / "tiles" / f"{sid}.parquet")
        tb = pd.read_parquet(b / "results" / "tiles" / f"{sid}.parquet")
        pd.testing.assert_frame_equal(ta, tb)
        assert ta.equals(tb) and len(ta) > 0, sid
        ga, gb = (json.loads((r / "results" / "tissue" / f"{sid}.geojson").read_text()) for r in (a, b))
        assert ga == gb and ga["features"], sid
        ra, rb = (_normalise(json.loads((r / "results" / "slides" / f"{sid}.json").read_text()), r) for r in (a, b))
        assert ra == rb, sid
        qa, qb = (np.asarray(Image.open(r / "results" / "tissue" / f"{sid}.png")) for r in (a, b))
        assert np.array_equal(qa, qb), sid
    sa, sb = (pd.read_parquet(r / "results" / "slides.parquet").drop(columns=sorted(TIMING_FIELDS)) for r in (a, b))
    sa["path"] = sa["path"].str.replace(str(a), "<run>", regex=False)
    sb["path"] = sb["path"].str.replace(str(b), "<run>", regex=False)
    pd.testing.assert_frame_equal(sa, sb)
    assert sa.equals(sb)


@pytest.mark.slow
def test_tiles_through_slurm_match_a_local_run(slurm_env, tmp_path):
    """`snakemake tiles --profile profiles/slurm-local`: every job goes through sbatch and
    completes in Slurm, and the outputs equal those of `--cores 2` on the same workflow."""
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(SMALL_DEMO))
    via_slurm, local = copy_workflow(tmp_path / "slurm"), copy_workflow(tmp_path / "local")

    # the local reference runs while the Slurm run waits on its jobs
    ref = subprocess.Popen([*SNAKEMAKE, "tiles", "--cores", "2", "--configfile", str(small)], cwd=local,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = snakemake_slurm(via_slurm, slurm_env, "tiles", "--configfile", str(small))
    ref_out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, ref_out[-4000:]

    # Snakemake submitted every job with sbatch ...
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", proc.output)
    assert job_counts(proc.output) == {"demo_slide": 2, "tiles_slide": 2, "slides_table": 1, "tiles": 1}
    assert len(submitted) == 4, "2 demo_slide jobs, 1 group of 2 tiles_slide jobs, 1 slides_table"
    for _, log in submitted:  # ... each has its Slurm log ...
        assert Path(log).is_file(), log
    slurm_logs = sorted(p.relative_to(via_slurm / ".snakemake" / "slurm_logs").parts[0]
                        for p in (via_slurm / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert slurm_logs == ["group_tiles_tiles_slide", "rule_demo_slide", "rule_demo_slide", "rule_slides_table"]
    group_log = next((via_slurm / ".snakemake" / "slurm_logs").glob("group_*/*.log")).read_text()
    for sid in ("synthetic_40x", "synthetic_20x"):  # both tiles jobs ran inside the group job
        assert re.search(rf"rule tiles_slide:.*?wildcards: slide={sid}", group_log, re.S), sid
    # ... and Slurm ran them all to completion
    jobs = slurm_jobs(slurm_env, run_id_of(proc.output))
    assert {j["id"] for j in jobs} == {jobid for jobid, _ in submitted}
    assert {j["state"] for j in jobs} == {"COMPLETED"}
    assert sorted(j["comment"] for j in jobs) == [
        "rule_demo_slide_wildcards_synthetic_20x", "rule_demo_slide_wildcards_synthetic_40x",
        "rule_slides_table", "rule_tiles_tiles_slide"]

    assert_same_outputs(via_slurm, local, ["synthetic_40x", "synthetic_20x"])


@pytest.mark.slow
def test_failed_slide_on_slurm_keep_going_then_rerun_only_what_is_missing(slurm_env, tmp_path):
    """failures_fatal: true and one corrupt slide among three. Its Slurm job fails (twice:
    the retry asks for twice the memory), the other group finishes (--keep-going), the run
    fails; after the file is fixed a rerun runs only the slides that have no output yet."""
    slides = tmp_path / "slides"
    slides.mkdir()
    good = slides / "good.tiff"
    run([sys.executable, "-m", "mrplip_core", "demo-slide", str(good), "--width", "4096", "--height", "4096",
         "--mpp", "0.5", "--seed", "3"], cwd=tmp_path)
    bad = slides / "c.svs"
    bad.write_bytes(b"II*\x00" + b"\x00corrupt slide, not a TIFF" * 64)
    table = tmp_path / "slides.tsv"  # slides a and b are the same file
    table.write_text("slide_id\tpath\na\tslides/good.tiff\nb\tslides/good.tiff\nc\tslides/c.svs\n")
    cfg = tmp_path / "fault.yaml"
    cfg.write_text(yaml.safe_dump({"slides": str(table), "demo": [], "failures_fatal": True}))
    wd = copy_workflow(tmp_path / "wf")
    # groups of 2: three slides make two Slurm jobs, one of which holds the corrupt slide
    args = ("tiles", "--configfile", str(cfg), "--group-components", "tiles=2")

    first = snakemake_slurm(wd, slurm_env, *args, check=False)
    assert first.returncode != 0
    done = {s for s in "abc" if (wd / "results" / "slides" / f"{s}.json").exists()}
    assert "c" not in done and done, f"the group without the corrupt slide finished: {done}"
    assert not (wd / "results" / "slides.parquet").exists()
    jobs = slurm_jobs(slurm_env, run_id_of(first.output))
    tiles_jobs = [j for j in jobs if j["comment"].startswith("rule_tiles")]
    failed = [j for j in tiles_jobs if j["state"] == "FAILED"]
    assert len(failed) == 2 and {j["mem"] for j in failed} == {"2000M", "4000M"}, tiles_jobs
    assert [j["state"] for j in tiles_jobs].count("COMPLETED") == 1, tiles_jobs
    assert "Error in group tiles" in first.output
    mtimes = {s: (wd / "results" / "tiles" / f"{s}.parquet").stat().st_mtime_ns for s in done}

    shutil.copy(good, bad)  # fix the input: now a readable slide
    missing = {"a", "b", "c"} - done
    rerun = snakemake_slurm(wd, slurm_env, *args)
    # the plan Snakemake prints first, and the jobs it then ran
    assert job_counts(rerun.output) == {"tiles_slide": len(missing), "slides_table": 1, "tiles": 1}
    assert set(re.findall(r"wildcards: slide=(\w+)", rerun.output)) == missing
    for s in done:  # finished slides were not redone
        assert (wd / "results" / "tiles" / f"{s}.parquet").stat().st_mtime_ns == mtimes[s]
    table_out = pd.read_parquet(wd / "results" / "slides.parquet").set_index("slide_id")
    assert table_out.status.to_dict() == {"a": "ok", "b": "ok", "c": "ok"}


# The multi-node pattern of docs/cluster.md, in a workflow of its own: rule `pretrain`
# launches its program with workflow/scripts/torchrun.sh; profiles/slurm-local makes it a
# two-node job (nodes: 2, tasks: 2, mpi: srun, one GPU per node). Each node then runs one
# process per GPU (1), not `threads` (2) processes.
DDP_PROGRAM = textwrap.dedent(
    """
    import json, os, socket, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    me = {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "node": os.environ.get("SLURMD_NODENAME"),
          "nnodes": int(os.environ.get("SLURM_NNODES", 0)), "world": world, "sum": total.item()}
    everyone = [None] * world
    dist.all_gather_object(everyone, me)
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(everyone, fh)
    dist.destroy_process_group()
    """
)
PRETRAIN_SNAKEFILE = textwrap.dedent(
    """
    import sys

    rule pretrain:
        output: "pretrain/ranks.json"
        log: "logs/pretrain.log"
        threads: 2
        resources:
            mem_mb=1000,
            runtime=10,
            mpi="",  # profiles/slurm(-local): "srun"
        shell:
            "bash workflow/scripts/torchrun.sh '{resources.mpi}' {threads} {sys.executable:q}"
            " workflow/scripts/ddp_check.py {output} > {log} 2>&1"
    """
)


def launcher_script() -> str:
    """workflow/scripts/torchrun.sh, which docs/cluster.md shows verbatim."""
    script = (REPO / "workflow" / "scripts" / "torchrun.sh").read_text()
    docs = (REPO / "docs" / "cluster.md").read_text()
    block = re.search(r"<!-- torchrun.sh -->\s*```bash\n(.*?)```", docs, re.S)[1]
    assert block == script, "docs/cluster.md shows another torchrun.sh than workflow/scripts/"
    return script


def pretrain_workflow(wd: Path) -> Path:
    (wd / "workflow" / "scripts").mkdir(parents=True)
    (wd / "workflow" / "Snakefile").write_text(PRETRAIN_SNAKEFILE)
    (wd / "workflow" / "scripts" / "torchrun.sh").write_text(launcher_script())
    (wd / "workflow" / "scripts" / "ddp_check.py").write_text(DDP_PROGRAM)
    return wd


def test_pretrain_pattern_without_slurm_runs_threads_processes(tmp_path):
    """The same rule on one machine (`--cores 2`): torchrun --standalone, `threads` processes."""
    wd = pretrain_workflow(tmp_path / "pretrain")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("CUDA_VISIBLE_DEVICES", "SNAKEMAKE_PROFILE")}
    run([*SNAKEMAKE, "--cores", "2"], cwd=wd, env=env)
    ranks = json.loads((wd / "pretrain" / "ranks.json").read_text())
    assert sorted(r["local_rank"] for r in ranks) == [0, 1]
    assert {r["world"] for r in ranks} == {2} and {r["sum"] for r in ranks} == {3.0}


@pytest.mark.slow
def test_multinode_pretrain_pattern_runs_one_torchrun_per_node(slurm_env, tmp_path):
    wd = pretrain_workflow(tmp_path / "pretrain")
    proc = snakemake_slurm(wd, slurm_env)

    ranks = json.loads((wd / "pretrain" / "ranks.json").read_text())
    # one torchrun per node, one process per (simulated) GPU, all in one process group
    assert sorted(r["node"] for r in ranks) == ["local-1", "local-2"]
    assert {r["world"] for r in ranks} == {2} and {r["nnodes"] for r in ranks} == {2}
    assert {r["local_rank"] for r in ranks} == {0}
    assert {r["sum"] for r in ranks} == {3.0}  # all_reduce of 1 + 2 crossed the nodes
    # what Slurm allocated: 2 nodes, 1 task per node, the GPUs per node
    (job,) = slurm_jobs(slurm_env, run_id_of(proc.output))
    info = run(["scontrol", "show", "job", job["id"]], cwd=wd, env=slurm_env).stdout
    assert re.search(r"NumNodes=2 ", info) and re.search(r"NumTasks=2 ", info), info
    assert "NtasksPerN:B:S:C=1:" in info and "TresPerNode=gres:gpu:sim:1" in info, info
    assert job["state"] == "COMPLETED"


def test_a_cohort_in_shards_keeps_each_slurm_command_short(tmp_path):
    """200 shards per stage: each shard rule gets its stage's profile entry, but the copies are
    not forwarded to every job's command line (`--set-resources` of 1,000 rule names would pass
    Linux's 128 KiB limit for one argument, and sbatch would fail with E2BIG)."""
    wd = copy_workflow(tmp_path / "wf")
    rows = "".join(f"S{i:04d}\t/nonexistent/S{i:04d}.svs\n" for i in range(400))
    (wd / "cohort.tsv").write_text("slide_id\tpath\n" + rows)
    spj = {"slides_per_job": 2}
    (wd / "cohort.yaml").write_text(yaml.safe_dump({
        "slides": "cohort.tsv", "demo": [], "wsi": {"thumbnail_mpp": 8.0, **spj}, "captions": spj, "features": spj,
        "pathflip": {"subcaptions": spj}}))
    calls = sbatch_calls(tmp_path, PROFILES / "slurm", "--configfile", "config.yaml", "cohort.yaml", "--", "tiles",
                         wd=wd)
    tiles = [c for c in calls if c["rule"].startswith("tiles_shard_")]
    assert tiles, calls[:3]
    longest = max(len(c["wrap"]) for c in calls)
    assert longest < 32_000, longest
    # the shard jobs still get the profile's tiles_shard entry (mem_mb: 4000 * attempt)
    assert all(int(flag(c["opts"], "--mem")) == 4000 * c["attempt"] for c in tiles), tiles[0]["opts"]
