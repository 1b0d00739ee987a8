# Stage 2: a caption for every patch (config `captions`), then the textual bags (keywords of
# each bag's captions). One job per slide, or per shard of `captions.slides_per_job` slides
# (one vLLM server start per job). Jobs resume from their part files after a failure.
from mrplip_core.wsi.table import shard_slides
from mrplip_core.captions.settings import CaptionSettings

CAPTIONS = CaptionSettings.from_dict(config["captions"])
# Full settings go on the command line; only what changes a caption is a rerun trigger
# (params), so tuning concurrency or threads does not re-caption anything.
CAPTIONS_SETTINGS_ARG = shlex.quote(json.dumps(config["captions"], sort_keys=True))
CAPTIONS_RESOURCES = dict(mem_mb=per_attempt(CAPTIONS.mem_mb), runtime=per_attempt(CAPTIONS.runtime), gpu=CAPTIONS.job_gpus)


if CAPTIONS.slides_per_job <= 1:

    rule captions_slide:
        input:
            manifest="results/tiles/{slide}.parquet",
            record="results/slides/{slide}.json",
        output:
            "results/captions/{slide}.parquet",
        params:
            digest=CAPTIONS.digest(),
            version=mrplip_core.__version__,
        log:
            "logs/captions/{slide}.log",
        threads: CAPTIONS.io_threads
        resources:
            **CAPTIONS_RESOURCES,
        shell:
            "{MRPLIP} captions {wildcards.slide:q} --results results"
            " --settings {CAPTIONS_SETTINGS_ARG} --log-dir logs/captions > {log} 2>&1"

else:
    _SHARDS = shard_slides(SLIDE_IDS, CAPTIONS.slides_per_job)
    apply_profile_resources("captions_shard", [f"captions_shard_{i}" for i in range(len(_SHARDS))])
    for _i, _ids in enumerate(_SHARDS):

        rule:
            name:
                f"captions_shard_{_i}"
            input:
                manifests=expand("results/tiles/{slide}.parquet", slide=_ids),
                records=expand("results/slides/{slide}.json", slide=_ids),
            output:
                expand("results/captions/{slide}.parquet", slide=_ids),
            params:
                slides=" ".join(shlex.quote(s) for s in _ids),
                digest=CAPTIONS.digest(),
                version=mrplip_core.__version__,
            log:
                f"logs/captions/shard_{_i}.log",
            threads: CAPTIONS.io_threads
            resources:
                **CAPTIONS_RESOURCES,
            shell:
                "{MRPLIP} captions {params.slides} --results results"
                " --settings {CAPTIONS_SETTINGS_ARG} --log-dir logs/captions > {log} 2>&1"


rule keywords_slide:
    input:
        captions="results/captions/{slide}.parquet",
        manifest="results/tiles/{slide}.parquet",
    output:
        "results/keywords/{slide}.parquet",
    params:
        keywords=json.dumps(config["captions"]["keywords"], sort_keys=True),
        version=mrplip_core.__version__,
    log:
        "logs/keywords/{slide}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{MRPLIP} keywords --captions {input.captions} --manifest {input.manifest} --out {output}"
        " --settings {CAPTIONS_SETTINGS_ARG} > {log} 2>&1"


rule captions:
    input:
        expand("results/captions/{slide}.parquet", slide=SLIDE_IDS),
        expand("results/keywords/{slide}.parquet", slide=SLIDE_IDS),
