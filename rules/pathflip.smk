# PathFLIP, stage 2: training over the slides' captions, sub-captions and patch features
# (plan: mrplip_core/train/pathflip_plan.py; library: mrplip_core/train/pathflip.py).
#
# One job per run for the whole cohort, launched like `pretrain` (torchrun: one process per
# GPU, or per CPU process with gloo); the Slurm profiles give it the GPU partition. Inputs: the
# slide-captions table, every slide's sub-captions and image features (shard markers when the
# stage runs in shards). A slide without a usable caption, sub-captions or features is left
# out with its reason in results/pathflip/{run}/slides.parquet; the others train. The exported
# model (written last) is the output; checkpoints/, metrics.csv and config.yaml beside it are
# not, so a killed job resumes exactly from its last checkpoint when rerun.
from mrplip_core.train.pathflip_plan import PathflipPlan

PATHFLIP_PLAN = PathflipPlan.from_config(config, results=str(LAYOUT.root))
PATHFLIP_RESOURCES = PATHFLIP_PLAN.resources


rule pathflip:
    input:
        captions=LAYOUT.pattern("slide_captions"),
        subcaptions=stage_files("subcaptions", SLIDE_IDS),
        image_features=stage_files("image_features", SLIDE_IDS, encoder=PATHFLIP_PLAN.image_encoder),
    output:
        model=LAYOUT.pattern("pathflip_model", run=PATHFLIP_PLAN.run),
    params:
        settings=PATHFLIP_PLAN.settings_arg,
        run_dir=LAYOUT.pattern("pathflip_dir", run=PATHFLIP_PLAN.run),
        nproc=PATHFLIP_RESOURCES["processes_per_node"],
        omp=PATHFLIP_RESOURCES["threads_per_process"],
        python=sys.executable,
        version=VERSION,
    log:
        f"logs/pathflip/{PATHFLIP_PLAN.run}.log",
    threads: PATHFLIP_RESOURCES["processes_per_node"] * PATHFLIP_RESOURCES["threads_per_process"]
    resources:
        gpu=PATHFLIP_RESOURCES["gpus_per_node"],
        mem_mb=PATHFLIP_RESOURCES["mem_mb"],
        runtime=PATHFLIP_RESOURCES["runtime"],
        mpi="",  # profiles/slurm: "srun" (see rules/pretrain.smk)
    shell:
        "OMP_NUM_THREADS={params.omp} bash {TORCHRUN_LAUNCHER:q} '{resources.mpi}' {params.nproc}"
        " {params.python:q} -m mrplip_core pathflip --settings {params.settings:q} --run-dir {params.run_dir:q}"
        " > {log} 2>&1"
