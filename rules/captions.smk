# Stage 2: a caption for every patch (config `captions`), then the textual bags (keywords of
# each bag's captions); plan: mrplip_core/captions/plan.py. One job per slide, or per shard of
# `captions.slides_per_job` slides (one vLLM server start per job). Jobs resume from their part
# files after a failure. Only what changes a caption is a rerun trigger (params), so tuning
# concurrency or threads does not re-caption anything.
CAPTIONS = CAPTIONS_PLAN.settings
CAPTIONS_SETTINGS_ARG = shlex.quote(CAPTIONS_PLAN.settings_arg)
CAPTIONS_RESOURCES = dict(
    mem_mb=per_attempt(CAPTIONS.mem_mb), runtime=per_attempt(CAPTIONS.runtime), gpu=CAPTIONS.job_gpus
)
KEYWORDS_RESOURCES = dict(mem_mb=2000, runtime=10)
CAPTIONS_LOGS = "logs/captions"


if CAPTIONS_PLAN.per_slide:

    rule captions_slide:
        input:
            lambda wc: stage_files("tiles", [wc.slide]),
            lambda wc: stage_files("slide_record", [wc.slide]),
        output:
            LAYOUT.pattern("captions"),
        params:
            digest=CAPTIONS_PLAN.trigger,
            version=VERSION,
        log:
            "logs/captions/{slide}.log",
        threads: CAPTIONS.io_threads
        resources:
            **CAPTIONS_RESOURCES,
        shell:
            "{MRPLIP} captions {wildcards.slide:q} --results {LAYOUT.root}"
            " --settings {CAPTIONS_SETTINGS_ARG} --log-dir {CAPTIONS_LOGS} > {log} 2>&1"

    rule keywords_slide:
        input:
            captions=LAYOUT.pattern("captions"),
            manifest=lambda wc: stage_files("tiles", [wc.slide]),
        output:
            LAYOUT.pattern("keywords"),
        params:
            keywords=CAPTIONS_PLAN.keywords_trigger,
            version=VERSION,
        log:
            "logs/keywords/{slide}.log",
        threads: 1
        resources:
            **KEYWORDS_RESOURCES,
        shell:
            "{MRPLIP} keywords {wildcards.slide:q} --results {LAYOUT.root} --settings {CAPTIONS_SETTINGS_ARG} > {log} 2>&1"

else:
    _CAPTION_SHARDS = CAPTIONS_PLAN.shards(SLIDE_IDS)
    for _name, _shard, _ids, _quoted in shard_rules("captions", _CAPTION_SHARDS):

        rule:
            name:
                _name
            input:
                stage_files("tiles", _ids),
                stage_files("slide_record", _ids),
            output:
                LAYOUT.expand("captions", slide=_ids),
                done=LAYOUT.pattern("captions_shard", shard=_shard),
            params:
                slides=_quoted,
                digest=CAPTIONS_PLAN.trigger,
                version=VERSION,
            log:
                f"logs/captions/shard_{_shard}.log",
            threads: CAPTIONS.io_threads
            resources:
                **CAPTIONS_RESOURCES,
            shell:
                "{MRPLIP} captions {params.slides} --results {LAYOUT.root}"
                " --settings {CAPTIONS_SETTINGS_ARG} --log-dir {CAPTIONS_LOGS} --done {output.done} > {log} 2>&1"

    for _name, _shard, _ids, _quoted in shard_rules("keywords", _CAPTION_SHARDS):

        rule:
            name:
                _name
            input:
                stage_files("captions", _ids),
                stage_files("tiles", _ids),
            output:
                LAYOUT.expand("keywords", slide=_ids),
                done=LAYOUT.pattern("keywords_shard", shard=_shard),
            params:
                slides=_quoted,
                keywords=CAPTIONS_PLAN.keywords_trigger,
                version=VERSION,
            log:
                f"logs/keywords/shard_{_shard}.log",
            threads: 1
            resources:
                mem_mb=4000,
                runtime=10 + len(_ids),
            shell:
                "{MRPLIP} keywords {params.slides} --results {LAYOUT.root} --settings {CAPTIONS_SETTINGS_ARG}"
                " --done {output.done} > {log} 2>&1"


rule captions:
    input:
        stage_target("captions"),
        stage_target("keywords"),
