# PathFLIP, stage 1: slide captions and their region-level sub-captions (plan:
# mrplip_core/pathflip/plan.py). One job makes the slide-captions table (a caption, or the reason
# there is none, per slide); then one job per slide, or per shard of
# `pathflip.subcaptions.slides_per_job` slides, splits each caption. With `method: llm` a job asks
# a language model (a server it starts and stops itself, as the captions jobs do, or
# `llm.openai.base_url`), one server start per job: its resources come from the `llm` section and
# the server's log goes to logs/subcaptions/. Jobs that start a server on a GPU (llm.gpus > 0) are
# named subcaptions_llm_slide and subcaptions_llm_shard_0, _1, ... so that a cluster profile can
# send them, and only them, to a GPU partition; the others (the rules, or llm on a running server
# at llm.openai.base_url) stay subcaptions_slide / subcaptions_shard_*, CPU jobs.
SUBCAPTIONS_SETTINGS_ARG = shlex.quote(SUBCAPTIONS_PLAN.settings_arg)
_CAPTION_FILE = SUBCAPTIONS_PLAN.settings.captions
_SUB_LLM = SUBCAPTIONS_PLAN.settings.subcaptions.method == "llm"
_SUB_LOG_DIR = " --log-dir logs/subcaptions" if _SUB_LLM else ""
_SUB_RES = SUBCAPTIONS_PLAN.subcaptions_resources
_SUB_RULE = "subcaptions_llm" if _SUB_RES["gpu"] > 0 else "subcaptions"
SUBCAPTIONS_RESOURCES = (
    dict(mem_mb=per_attempt(_SUB_RES["mem_mb"]), runtime=per_attempt(_SUB_RES["runtime"]), gpu=_SUB_RES["gpu"])
    if _SUB_LLM else dict(mem_mb=2000, runtime=10)
)


rule slide_captions:
    input:
        table=config["slides"],
        captions=[_CAPTION_FILE] if _CAPTION_FILE else [],
    output:
        LAYOUT.pattern("slide_captions"),
    params:
        trigger=SUBCAPTIONS_PLAN.captions_trigger,
        version=VERSION,
    log:
        "logs/slide_captions.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{MRPLIP} slide-captions --table {input.table:q} --results {LAYOUT.root}"
        " --settings {SUBCAPTIONS_SETTINGS_ARG} > {log} 2>&1"


if SUBCAPTIONS_PLAN.per_slide:

    rule:
        name:
            f"{_SUB_RULE}_slide"
        input:
            LAYOUT.pattern("slide_captions"),
        output:
            LAYOUT.pattern("subcaptions"),
        params:
            trigger=SUBCAPTIONS_PLAN.subcaptions_trigger,
            version=VERSION,
        log:
            "logs/subcaptions/{slide}.log",
        threads: 1
        resources:
            **SUBCAPTIONS_RESOURCES,
        shell:
            "{MRPLIP} subcaptions {wildcards.slide:q} --results {LAYOUT.root}"
            " --settings {SUBCAPTIONS_SETTINGS_ARG}{_SUB_LOG_DIR} > {log} 2>&1"

else:
    for _name, _shard, _ids, _quoted in shard_rules(_SUB_RULE, SUBCAPTIONS_PLAN.shards(SLIDE_IDS)):

        rule:
            name:
                _name
            input:
                LAYOUT.pattern("slide_captions"),
            output:
                LAYOUT.expand("subcaptions", slide=_ids),
                done=LAYOUT.pattern("subcaptions_shard", shard=_shard),
            params:
                slides=_quoted,
                trigger=SUBCAPTIONS_PLAN.subcaptions_trigger,
                version=VERSION,
            log:
                f"logs/subcaptions/shard_{_shard}.log",
            threads: 1
            resources:
                **(SUBCAPTIONS_RESOURCES if _SUB_LLM else dict(mem_mb=2000, runtime=10 + len(_ids) // 100)),
            shell:
                "{MRPLIP} subcaptions {params.slides} --results {LAYOUT.root}"
                " --settings {SUBCAPTIONS_SETTINGS_ARG}{_SUB_LOG_DIR} --done {output.done} > {log} 2>&1"


rule subcaptions:
    input:
        LAYOUT.pattern("slide_captions"),
        stage_target("subcaptions"),
