# Using the models: text-to-region localisation (plan: mrplip_core/use/plan.py; library:
# mrplip_core/use/localize.py; verb: mrplip localize).
#
# One job per model (the PathFLIP run of localize.model, default pathflip.run, and the MR-PLIP
# baseline of localize.baseline if set) over every configured slide and query. It writes, per
# (slide, query), the per-patch scores, the heatmap PNG and the QuPath GeoJSON below
# results/localize/{family}-{run}/{slide}/, and the summary table, its output. A slide that
# cannot be localised (unknown id, no features) is recorded in the summary with the reason and
# the others are done (--keep-going), unless failures_fatal.
from mrplip_core.use.plan import LocalizePlan

LOCALIZE_PLAN = LocalizePlan.from_config(config, SLIDE_IDS)
LOCALIZE_SLIDES = [s for s in LOCALIZE_PLAN.slides if s in SLIDE_IDS]

for _job in LOCALIZE_PLAN.jobs:

    rule:
        name:
            f"localize_{_job.family}"
        input:
            model=LAYOUT.pattern(_job.model_artifact, run=_job.run),
            image_features=stage_files("image_features", LOCALIZE_SLIDES, encoder=FEATURES_PLAN.image_encoder),
        output:
            summary=LAYOUT.pattern("localize_summary", model=_job.label),
        params:
            run_dir=LAYOUT.pattern(_job.run_dir_artifact, run=_job.run),
            slides=" ".join(f"--slide {shlex.quote(s)}" for s in LOCALIZE_PLAN.slides),
            texts=" ".join(f"--text {shlex.quote(q)}" for q in LOCALIZE_PLAN.settings.queries),
            settings=LOCALIZE_PLAN.settings_arg,
            keep_going="" if LOCALIZE_PLAN.fatal else "--keep-going",
            version=VERSION,
        log:
            f"logs/localize/{_job.label}.log",
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        shell:
            "{MRPLIP} localize --model {params.run_dir:q} {params.slides} {params.texts}"
            " --results {LAYOUT.root:q} --settings {params.settings:q} --summary {output.summary:q}"
            " {params.keep_going} > {log} 2>&1"


rule localize:
    input:
        LAYOUT.expand("localize_summary", model=[job.label for job in LOCALIZE_PLAN.jobs]),
