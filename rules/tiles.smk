# Stage 1: tissue masks and hierarchical multi-magnification tiles, one job per slide.


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


rule tiles_slide:
    input:
        slide_input,
    output:
        manifest="results/tiles/{slide}.parquet",
        geojson="results/tissue/{slide}.geojson",
        qc="results/tissue/{slide}.png",
        record="results/slides/{slide}.json",
    params:
        path=lambda wc: SLIDES.at[wc.slide, "path"],
        mpp=slide_mpp_arg,
        settings=WSI_SETTINGS,
        version=mrplip_core.__version__,
    log:
        "logs/tiles/{slide}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "{MRPLIP} tiles --slide-id {wildcards.slide:q} --path {params.path:q} {params.mpp}"
        " --settings {params.settings:q} --manifest {output.manifest} --geojson {output.geojson}"
        " --qc {output.qc} --record {output.record} > {log} 2>&1"


rule slides_table:
    input:
        expand("results/slides/{slide}.json", slide=SLIDE_IDS),
    output:
        "results/slides.parquet",
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
        "{MRPLIP} slides-table --table {params.table:q} --records results/slides --out {output}"
        " {params.fatal} > {log} 2>&1"


rule tiles:
    input:
        "results/slides.parquet",
        expand("results/tiles/{slide}.parquet", slide=SLIDE_IDS),
