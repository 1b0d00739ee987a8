# Stage 5: evaluation (config `evaluation`) and the HTML report. The plan (which models, which
# tile sets, which files each job needs) is mrplip_core.evaluation.plan; this file only turns it
# into rules. Models are the frozen-encoder baselines ("frozen-{encoder}", no pretraining) and
# every pretrain run; each is evaluated on every configured tile set (zero-shot, linear probe,
# k-shot), runs also on retrieval over held-out patch/caption pairs. Frozen tile features are
# computed once per (encoder, dataset) and shared by the baseline and every run on that encoder.
import json

from mrplip_core.evaluation.plan import EvaluationPlan, alternatives
from mrplip_core.layout import RETRIEVAL

EVAL_PLAN = EvaluationPlan.from_config(
    config,
    SLIDE_IDS,
    run_encoders=PRETRAIN_PLAN.run_encoders,  # each run's image encoder, from its resolved section
    layout=LAYOUT,
    slide_files=lambda name, **fixed: stage_files(name, SLIDE_IDS, **fixed),  # slides' files or shard markers
    bundled_root=os.path.normpath(os.path.join(workflow.basedir, "..")),  # shipped prompt files
    pathflip_runs={PATHFLIP_PLAN.run: PATHFLIP_PLAN.image_encoder},  # slide level (rules/pathflip.smk)
)
EVAL = EVAL_PLAN.settings
# Not sorted: the report lists datasets in the order the config gives them.
EVAL_SETTINGS_ARG = shlex.quote(
    json.dumps({"evaluation": config.get("evaluation") or {}, "features": config.get("features") or {}})
)


rule eval_tile_features:
    input:
        tiles=lambda wc: EVAL_PLAN.datasets[wc.dataset].path,
    output:
        LAYOUT.pattern("eval_tile_features"),
    wildcard_constraints:
        dataset=alternatives(list(EVAL_PLAN.datasets), "no-datasets"),
    params:
        trigger=lambda wc: EVAL_PLAN.tile_features_trigger(wc.dataset),
        # the encoder weights (path, size, mtime), as for the slide features (rules/features.smk)
        weights=lambda wc: FEATURES_PLAN.image_trigger(wc.encoder),
        version=mrplip_core.__version__,
    log:
        "logs/eval/features/{encoder}/{dataset}.log",
    threads: EVAL.threads
    resources:
        mem_mb=per_attempt(EVAL.mem_mb),
        runtime=per_attempt(EVAL.runtime),
        gpu=EVAL.gpu,
    shell:
        "{MRPLIP} eval-features --dataset {wildcards.dataset} --encoder {wildcards.encoder} --out {output}"
        " --settings {EVAL_SETTINGS_ARG} --threads {threads} > {log} 2>&1"


rule eval_dataset:
    input:
        unpack(lambda wc: EVAL_PLAN.dataset_inputs(wc.model, wc.dataset)),
    output:
        LAYOUT.pattern("eval_metrics"),
    wildcard_constraints:
        model=alternatives(EVAL_PLAN.models, "no-models"),
        dataset=alternatives(list(EVAL_PLAN.datasets), "no-datasets"),
    params:
        features=lambda wc, input: f"--tile-features {input.features}" if "features" in input.keys() else "",
        prompts=lambda wc, input: f"--prompts {shlex.quote(input.prompts)}" if "prompts" in input.keys() else "",
        trigger=lambda wc: EVAL_PLAN.dataset_trigger(wc.dataset),
        version=mrplip_core.__version__,
    log:
        "logs/eval/{model}/{dataset}.log",
    threads: EVAL.threads
    resources:
        mem_mb=per_attempt(EVAL.mem_mb),
        runtime=per_attempt(EVAL.runtime),
    shell:
        "{MRPLIP} evaluate --model {wildcards.model} --dataset {wildcards.dataset} --results {LAYOUT.root}"
        " {params.features} {params.prompts}"
        " --settings {EVAL_SETTINGS_ARG} --threads {threads} > {log} 2>&1"


rule eval_retrieval:
    input:
        unpack(lambda wc: EVAL_PLAN.retrieval_inputs(wc.model)),
    output:
        LAYOUT.pattern("eval_metrics", dataset=RETRIEVAL),
    wildcard_constraints:
        model=alternatives(EVAL_PLAN.runs, "no-runs"),
    params:
        trigger=EVAL.digest("retrieval", "embedding"),
        version=mrplip_core.__version__,
    log:
        "logs/eval/{model}/retrieval.log",
    threads: EVAL.threads
    resources:
        mem_mb=per_attempt(EVAL.mem_mb),
        runtime=per_attempt(EVAL.runtime),
    shell:
        "{MRPLIP} evaluate-retrieval --model {wildcards.model} --results {LAYOUT.root} --settings {EVAL_SETTINGS_ARG} --threads {threads} > {log} 2>&1"


rule eval_slides:
    input:
        unpack(lambda wc: EVAL_PLAN.slide_eval_inputs(wc.model)),
    output:
        LAYOUT.pattern("eval_metrics", dataset="slides"),
    wildcard_constraints:
        model=alternatives(EVAL_PLAN.slide_models, "no-slide-models"),
    params:
        trigger=EVAL.digest("slides", "linear_probe"),
        pathflip_run=PATHFLIP_PLAN.run,
        version=mrplip_core.__version__,
    log:
        "logs/eval/{model}/slides.log",
    threads: EVAL.threads
    resources:
        mem_mb=per_attempt(EVAL.mem_mb),
        runtime=per_attempt(EVAL.runtime),
    shell:
        "{MRPLIP} evaluate-slides --model {wildcards.model} --table {input.table:q} --results {LAYOUT.root}"
        " --pathflip-run {params.pathflip_run} --settings {EVAL_SETTINGS_ARG} --threads {threads} > {log} 2>&1"


rule eval_summary:
    input:
        EVAL_PLAN.metrics_files(),
    output:
        LAYOUT.pattern("eval_summary"),
    log:
        "logs/eval/summary.log",
    threads: 1
    resources:
        mem_mb=per_attempt(1000),
        runtime=per_attempt(10),
    shell:
        "{MRPLIP} eval-summary --out {output} {input} > {log} 2>&1"


rule html_report:
    input:
        **EVAL_PLAN.report_inputs(),
    output:
        LAYOUT.pattern("report"),
    params:
        report=EVAL.digest("report"),
        runs=",".join(EVAL_PLAN.runs),
        baselines=",".join(EVAL_PLAN.baselines),
        version=mrplip_core.__version__,
    log:
        "logs/report.log",
    threads: 1
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(30),
    shell:
        "{MRPLIP} report --results {LAYOUT.root} --runs {params.runs:q} --baselines {params.baselines:q}"
        " --settings {EVAL_SETTINGS_ARG} > {log} 2>&1"


rule evaluate:
    input:
        LAYOUT.pattern("eval_summary"),
        LAYOUT.pattern("report"),
