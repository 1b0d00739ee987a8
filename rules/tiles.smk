# Stage 1: tissue masks and hierarchical multi-magnification tiles (plan: mrplip_core/wsi/plan.py).
# One job per slide, or per shard of `wsi.slides_per_job` slides.
from mrplip_core.wsi.plan import slide_rows

TILES_SETTINGS_ARG = shlex.quote(TILES_PLAN.settings_arg)
TILES_OUTPUTS = ("tiles", "tissue_geojson", "tissue_qc", "slide_record")


rule demo_slide:
    output:
        "demo/{demo}.tiff",
    params:
        spec=lambda wc: DEMO[wc.demo],
    log:
        "logs/demo_slide/{demo}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    shell:
        "{MRPLIP} demo-slide {output} --width {params.spec[width]} --height {params.spec[height]}"
        " --mpp {params.spec[mpp]} --seed {params.spec[seed]} > {log} 2>&1"


if TILES_PLAN.per_slide:

    rule tiles_slide:
        input:
            lambda wc: slide_files([wc.slide]),
        output:
            **{name: LAYOUT.pattern(name) for name in TILES_OUTPUTS},
        params:
            rows=lambda wc: slide_rows(SLIDES, [wc.slide]),
            settings=TILES_PLAN.trigger,
            version=VERSION,
        log:
            "logs/tiles/{slide}.log",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        shell:
            "{MRPLIP} tiles {wildcards.slide:q} --table {config[slides]:q} --results {LAYOUT.root}"
            " --settings {TILES_SETTINGS_ARG} > {log} 2>&1"

else:
    for _name, _shard, _ids, _quoted in shard_rules("tiles", TILES_PLAN.shards(SLIDE_IDS)):

        rule:
            name:
                _name
            input:
                slide_files(_ids),
            output:
                **{name: LAYOUT.expand(name, slide=_ids) for name in TILES_OUTPUTS},
                done=LAYOUT.pattern("tiles_shard", shard=_shard),
            params:
                slides=_quoted,
                rows=slide_rows(SLIDES, _ids),
                settings=TILES_PLAN.trigger,
                version=VERSION,
            log:
                f"logs/tiles/shard_{_shard}.log",
            threads: 1
            resources:
                mem_mb=2000,
                runtime=per_attempt(10 + 2 * len(_ids)),  # minutes: a slide takes seconds
            shell:
                "{MRPLIP} tiles {params.slides} --table {config[slides]:q} --results {LAYOUT.root}"
                " --settings {TILES_SETTINGS_ARG} --done {output.done} > {log} 2>&1"


rule slides_table:
    input:
        stage_files("slide_record", SLIDE_IDS),
    output:
        LAYOUT.pattern("slides_table"),
    params:
        table=config["slides"],
        fatal="--fatal" if config["failures_fatal"] else "",
    log:
        "logs/slides_table.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{MRPLIP} slides-table --table {params.table:q} --results {LAYOUT.root} {params.fatal} > {log} 2>&1"


rule tiles:
    input:
        LAYOUT.pattern("slides_table"),
        stage_target("tiles"),
