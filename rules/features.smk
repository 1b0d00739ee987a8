# Stage 3: frozen-encoder features into HDF5 (plan: mrplip_core/features/plan.py).
# Image: features/{encoder}/{slide}.h5 from the tile manifest; text: text_features/{encoder}/
# {slide}.h5 from the captions stage's captions and keywords. One job per slide, or per shard
# of `features.slides_per_job` slides (the encoder is built once per job). Only what changes a
# feature is a rerun trigger (params); tuning batch size, workers or threads recomputes nothing.
from mrplip_core.encoders import list_encoders

FEATURES = FEATURES_PLAN.settings
FEATURES_SETTINGS_ARG = shlex.quote(FEATURES_PLAN.settings_arg)
FEATURES_RESOURCES = dict(
    mem_mb=per_attempt(FEATURES.mem_mb), runtime=per_attempt(FEATURES.runtime), gpu=FEATURES.gpu
)


# Image features per slide: every image encoder when the stage runs a job per slide; in shards,
# only encoders other than features.image_encoder (a run trained earlier on another encoder,
# evaluated again), whose features no shard rule makes.
_PER_SLIDE_IMAGE_ENCODERS = "|".join(
    e for e in list_encoders("image") if FEATURES_PLAN.per_slide or e != FEATURES_PLAN.image_encoder
)


rule features_slide:
    input:
        lambda wc: stage_files("tiles", [wc.slide]),
        lambda wc: stage_files("slide_record", [wc.slide]),
    output:
        LAYOUT.pattern("image_features"),
    wildcard_constraints:
        encoder=_PER_SLIDE_IMAGE_ENCODERS,
    params:
        trigger=lambda wildcards: FEATURES_PLAN.image_trigger(wildcards.encoder),
        version=VERSION,
    log:
        "logs/features/{encoder}/{slide}.log",
    threads: FEATURES.threads
    resources:
        **FEATURES_RESOURCES,
    shell:
        "{MRPLIP} features {wildcards.slide:q} --encoder {wildcards.encoder:q} --results {LAYOUT.root}"
        " --settings {FEATURES_SETTINGS_ARG} --threads {threads} > {log} 2>&1"


if FEATURES_PLAN.per_slide:

    rule text_features_slide:
        input:
            lambda wc: stage_files("captions", [wc.slide]),
            lambda wc: stage_files("keywords", [wc.slide]),
        output:
            LAYOUT.pattern("text_features"),
        wildcard_constraints:
            encoder="|".join(list_encoders("text")),
        params:
            trigger=lambda wildcards: FEATURES_PLAN.text_trigger(wildcards.encoder),
            version=VERSION,
        log:
            "logs/text_features/{encoder}/{slide}.log",
        threads: FEATURES.threads
        resources:
            **FEATURES_RESOURCES,
        shell:
            "{MRPLIP} text-features {wildcards.slide:q} --encoder {wildcards.encoder:q} --results {LAYOUT.root}"
            " --settings {FEATURES_SETTINGS_ARG} --threads {threads} > {log} 2>&1"

else:
    _FEATURE_SHARDS = FEATURES_PLAN.shards(SLIDE_IDS)
    _IMAGE, _TEXT = FEATURES_PLAN.image_encoder, FEATURES_PLAN.text_encoder
    for _name, _shard, _ids, _quoted in shard_rules("features", _FEATURE_SHARDS):

        rule:
            name:
                _name
            input:
                stage_files("tiles", _ids),
                stage_files("slide_record", _ids),
            output:
                LAYOUT.expand("image_features", encoder=_IMAGE, slide=_ids),
                done=LAYOUT.pattern("image_features_shard", encoder=_IMAGE, shard=_shard),
            params:
                slides=_quoted,
                trigger=FEATURES_PLAN.image_trigger(_IMAGE),
                version=VERSION,
            log:
                f"logs/features/{_IMAGE}/shard_{_shard}.log",
            threads: FEATURES.threads
            resources:
                **FEATURES_RESOURCES,
            shell:
                "{MRPLIP} features {params.slides} --encoder {_IMAGE} --results {LAYOUT.root}"
                " --settings {FEATURES_SETTINGS_ARG} --threads {threads} --done {output.done} > {log} 2>&1"

    for _name, _shard, _ids, _quoted in shard_rules("text_features", _FEATURE_SHARDS):

        rule:
            name:
                _name
            input:
                stage_files("captions", _ids),
                stage_files("keywords", _ids),
            output:
                LAYOUT.expand("text_features", encoder=_TEXT, slide=_ids),
                done=LAYOUT.pattern("text_features_shard", encoder=_TEXT, shard=_shard),
            params:
                slides=_quoted,
                trigger=FEATURES_PLAN.text_trigger(_TEXT),
                version=VERSION,
            log:
                f"logs/text_features/{_TEXT}/shard_{_shard}.log",
            threads: FEATURES.threads
            resources:
                **FEATURES_RESOURCES,
            shell:
                "{MRPLIP} text-features {params.slides} --encoder {_TEXT} --results {LAYOUT.root}"
                " --settings {FEATURES_SETTINGS_ARG} --threads {threads} --done {output.done} > {log} 2>&1"


rule features:
    input:
        stage_target("image_features", encoder=FEATURES_PLAN.image_encoder),
        stage_target("text_features", encoder=FEATURES_PLAN.text_encoder),
