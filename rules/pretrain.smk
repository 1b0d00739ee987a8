# Stage: MR-PLIP pretraining over the per-slide feature files (stage target rule 'pretrain').
#
# One job for the whole cohort: `torchrun` starts one process per GPU (or per CPU process
# with gloo when there is no GPU), each reading bags lazily from the per-slide HDF5/Parquet
# files. The outputs are the exported model (written last); config.yaml, metrics.csv,
# tokenizer/ and checkpoints/ in the same folder are not rule outputs, so Snakemake never
# deletes them: a job killed by a time limit resumes exactly from its last checkpoint when
# rerun, and its metrics continue.
# A changed pretrain config reruns the rule; if the run already has checkpoints the
# trainer refuses to resume them with a different config (use a new pretrain.run name).
#
# Multi-node (docs/cluster.md, profiles/slurm): the profile gives this rule `nodes`,
# `tasks` = nodes, `gres: gpu:<type>:<GPUs per node>` and `mpi: srun`; the launcher
# workflow/scripts/torchrun.sh then runs `srun` once, which starts one
# `torchrun --nnodes=N --nproc-per-node=<GPUs on the node> --rdzv-backend=c10d
# --rdzv-endpoint=<first node>:<port>` per node; ranks meet there and NCCL connects them.
# Without Slurm (resources.mpi empty) it runs `torchrun --standalone --nproc-per-node=P`.
# The run folder must be on a filesystem every node sees (each rank writes its RNG state).


import re

from mrplip_core.config_schema import check_section, section_schema
from mrplip_core.train.ablations import expand_runs

TORCHRUN_LAUNCHER = os.path.join(workflow.basedir, "scripts", "torchrun.sh")


# Runs: the pretrain section under pretrain.run, plus one per `ablations` entry (that section
# with the entry's keys changed, under the entry's name). Each is checked against the schema's
# pretrain section, as common.smk's validate checks the main one.
PRETRAIN_MAIN_RUN = config["pretrain"]["run"]
PRETRAIN_SETTINGS = expand_runs(config["pretrain"], config.get("ablations"))
for _name in list(PRETRAIN_SETTINGS)[1:]:
    try:
        PRETRAIN_SETTINGS[_name] = check_section(PRETRAIN_SETTINGS[_name], section_schema("pretrain", CONFIG_SCHEMA), "pretrain")
    except ValueError as exc:
        raise ValueError(f"config ablations.{_name}: the pretrain section it makes is invalid: {exc}") from None
PRETRAIN_RUNS = list(PRETRAIN_SETTINGS)  # read by rules/evaluate.smk
PRETRAIN_ABLATIONS = PRETRAIN_RUNS[1:]
_IMAGE_ENCODER = config["features"]["image_encoder"]
_TEXT_ENCODER = config["features"]["text_encoder"]


def RUN_IMAGE_ENCODER(run):  # read by rules/evaluate.smk: every run trains on these features
    return _IMAGE_ENCODER


def pretrain_settings_json(run):
    """A run's pretrain section, pointed at this workflow's results and feature encoders
    (also the rerun trigger: a changed setting reruns the run)."""
    section = PRETRAIN_SETTINGS[run]
    data = {**section.get("data", {}), "results": "results", "image_encoder": _IMAGE_ENCODER,
            "text_encoder": _TEXT_ENCODER}
    return json.dumps({**section, "data": data}, sort_keys=True)


rule pretrain:
    input:
        slides="results/slides.parquet",
        tiles=expand("results/tiles/{slide}.parquet", slide=SLIDE_IDS),
        captions=expand("results/captions/{slide}.parquet", slide=SLIDE_IDS),
        image_features=expand(
            "results/features/{encoder}/{slide}.h5",
            encoder=_IMAGE_ENCODER,
            slide=SLIDE_IDS,
        ),
        text_features=expand(
            "results/text_features/{encoder}/{slide}.h5",
            encoder=_TEXT_ENCODER,
            slide=SLIDE_IDS,
        ),
    output:
        model=f"results/pretrain/{PRETRAIN_MAIN_RUN}/model.safetensors",
        model_json=f"results/pretrain/{PRETRAIN_MAIN_RUN}/model.json",
    params:
        settings=pretrain_settings_json(PRETRAIN_MAIN_RUN),
        run_dir=f"results/pretrain/{PRETRAIN_MAIN_RUN}",
        nproc=config["pretrain"]["resources"].get("processes_per_node", 1),
        omp=config["pretrain"]["resources"].get("threads_per_process", 1),
        python=sys.executable,
        version=mrplip_core.__version__,
    log:
        f"logs/pretrain/{PRETRAIN_MAIN_RUN}.log",
    threads: config["pretrain"]["resources"]["processes_per_node"] * config["pretrain"]["resources"]["threads_per_process"]
    resources:
        gpu=config["pretrain"]["resources"].get("gpus_per_node", 0),
        mem_mb=config["pretrain"]["resources"].get("mem_mb", 16000),
        runtime=config["pretrain"]["resources"].get("runtime", 2880),
        # profiles/slurm sets "srun": one torchrun per node of the allocation. Quoted by hand in
        # the command: `{resources.mpi:q}` renders "" as nothing, which shifts the launcher's
        # arguments on a machine without Slurm.
        mpi="",
    shell:
        "OMP_NUM_THREADS={params.omp} bash {TORCHRUN_LAUNCHER:q} '{resources.mpi}' {params.nproc}"
        " {params.python:q} -m mrplip_core pretrain --settings {params.settings:q} --run-dir {params.run_dir:q}"
        " > {log} 2>&1"


# An ablation: the same job on its own run folder (profiles give it pretrain's resources).
use rule pretrain as pretrain_ablation with:
    output:
        model="results/pretrain/{run}/model.safetensors",
        model_json="results/pretrain/{run}/model.json",
    wildcard_constraints:
        run="|".join(re.escape(r) for r in PRETRAIN_ABLATIONS) or "no-ablations",
    params:
        settings=lambda wc: pretrain_settings_json(wc.run),
        run_dir=lambda wc: f"results/pretrain/{wc.run}",
        nproc=config["pretrain"]["resources"].get("processes_per_node", 1),
        omp=config["pretrain"]["resources"].get("threads_per_process", 1),
        python=sys.executable,
        version=mrplip_core.__version__,
    log:
        "logs/pretrain/{run}.log",
