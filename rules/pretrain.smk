# Stage 4: MR-PLIP pretraining over the per-slide feature files (plan: mrplip_core/train/plan.py).
#
# One job per run for the whole cohort: `torchrun` starts one process per GPU (or per CPU
# process with gloo when there is no GPU), each reading bags lazily from the per-slide
# HDF5/Parquet files. Runs: `pretrain.run`, plus one per `ablations` entry (that section with
# the entry's keys changed, under the entry's name), each resolved once by the plan. The
# outputs are the exported model (written last); config.yaml, metrics.csv, tokenizer/ and
# checkpoints/ in the same folder are not rule outputs, so Snakemake never deletes them: a job
# killed by a time limit resumes exactly from its last checkpoint when rerun, and its metrics
# continue. A changed pretrain config reruns the rule; if the run already has checkpoints the
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
from mrplip_core.train.plan import PretrainPlan

# Each ablation's pretrain section is checked against the schema's pretrain section, as
# common.smk's validate checks the main one.
_PRETRAIN_SCHEMA = section_schema("pretrain", CONFIG_SCHEMA)
PRETRAIN_PLAN = PretrainPlan.from_config(
    config, results=str(LAYOUT.root), check=lambda section: check_section(section, _PRETRAIN_SCHEMA, "pretrain")
)
PRETRAIN_RESOURCES = PRETRAIN_PLAN.resources
TORCHRUN_LAUNCHER = os.path.join(workflow.basedir, "scripts", "torchrun.sh")


def pretrain_inputs(run):
    """What a run reads: the slide table, and tiles, captions and features of every slide."""
    plan = PRETRAIN_PLAN.runs[run]
    return dict(
        slides=LAYOUT.pattern("slides_table"),
        tiles=stage_files("tiles", SLIDE_IDS),
        captions=stage_files("captions", SLIDE_IDS),
        image_features=stage_files("image_features", SLIDE_IDS, encoder=plan.image_encoder),
        text_features=stage_files("text_features", SLIDE_IDS, encoder=plan.text_encoder
        ),
    )


rule pretrain:
    input:
        **pretrain_inputs(PRETRAIN_PLAN.main),
    output:
        model=LAYOUT.pattern("model", run=PRETRAIN_PLAN.main),
        model_json=LAYOUT.pattern("model_json", run=PRETRAIN_PLAN.main),
    params:
        settings=PRETRAIN_PLAN.runs[PRETRAIN_PLAN.main].settings_arg,
        run_dir=LAYOUT.pattern("run_dir", run=PRETRAIN_PLAN.main),
        nproc=PRETRAIN_RESOURCES["processes_per_node"],
        omp=PRETRAIN_RESOURCES["threads_per_process"],
        python=sys.executable,
        version=VERSION,
    log:
        f"logs/pretrain/{PRETRAIN_PLAN.main}.log",
    threads: PRETRAIN_RESOURCES["processes_per_node"] * PRETRAIN_RESOURCES["threads_per_process"]
    resources:
        gpu=PRETRAIN_RESOURCES["gpus_per_node"],
        mem_mb=PRETRAIN_RESOURCES["mem_mb"],
        runtime=PRETRAIN_RESOURCES["runtime"],
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
    input:
        unpack(lambda wc: pretrain_inputs(wc.run)),
    output:
        model=LAYOUT.pattern("model"),
        model_json=LAYOUT.pattern("model_json"),
    wildcard_constraints:
        run="|".join(re.escape(r) for r in PRETRAIN_PLAN.ablations) or "no-ablations",
    params:
        settings=lambda wc: PRETRAIN_PLAN.runs[wc.run].settings_arg,
        run_dir=lambda wc: LAYOUT.pattern("run_dir", run=wc.run),
        nproc=PRETRAIN_RESOURCES["processes_per_node"],
        omp=PRETRAIN_RESOURCES["threads_per_process"],
        python=sys.executable,
        version=VERSION,
    log:
        "logs/pretrain/{run}.log",
