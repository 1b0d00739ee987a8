# Helpers shared by every stage: config validation, the slide table, input functions.
# Logic lives in mrplip_core; this file only connects it to Snakemake.
import json
import os
import shlex
import sys

from snakemake.utils import validate

import mrplip_core
from mrplip_core.config_schema import apply_schema_types, load_schema
from mrplip_core.wsi.table import SLIDE_ID_PATTERN, read_slide_table

CONFIG_SCHEMA = os.path.join(workflow.basedir, "schemas", "config.schema.yaml")
# `--config tiling='{n_parents: 5}'` hands Snakemake "5": read such values with the schema's types.
config.update(apply_schema_types(config, load_schema(CONFIG_SCHEMA)))
validate(config, "../workflow/schemas/config.schema.yaml")

SLIDES = read_slide_table(config["slides"])
SLIDE_IDS = list(SLIDES.index)

# The rules call the library through the Python that runs Snakemake (the project venv),
# so they work whether or not the venv is activated.
MRPLIP = f"{shlex.quote(sys.executable)} -m mrplip_core"

DEMO = {d["name"]: d for d in config.get("demo", [])}


def apply_profile_resources(entry, rule_names):
    """Give the generated rules ``rule_names`` (shards: captions_shard_0, _1, ...) the profile's
    ``set-resources`` / ``set-threads`` entry ``entry`` (e.g. ``captions_shard``): Snakemake
    matches those entries by exact rule name. Call before the rules are defined."""
    settings = getattr(workflow, "resource_settings", None)
    for table in ("_parsed_overwrite_resources", "_parsed_overwrite_threads"):
        parsed = getattr(settings, table, None)
        if isinstance(parsed, dict) and entry in parsed:
            for name in rule_names:
                parsed.setdefault(name, parsed[entry])


def per_attempt(base):
    """A rule resource that grows with the attempt, as the profiles' ``2000 * attempt``: ``base``
    on the first try, twice that on the retry (profiles/slurm ``retries: 1``), so a job
    killed for memory or time is resubmitted with more. For the resources that rules take
    from the config (GPU stages), which the profiles leave alone."""
    return lambda wildcards, attempt: base * attempt


wildcard_constraints:
    slide=SLIDE_ID_PATTERN,
    demo="|".join(DEMO) or "no-demo-slides",


def _workdir_relative(path):
    """Paths under the working directory become relative so they match rule outputs."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def slide_input(wildcards):
    """The slide file as a job input, or nothing when it is missing.

    A missing file is not a DAG error: the tiles job runs and records it as failed, so
    the rest of the cohort finishes. Demo slides are made by rule demo_slide.
    """
    path = _workdir_relative(SLIDES.at[wildcards.slide, "path"])
    stem = os.path.splitext(os.path.basename(path))[0]
    is_demo = stem in DEMO and path == f"demo/{stem}.tiff"
    return [path] if (is_demo or os.path.exists(path)) else []


def slide_mpp_arg(wildcards):
    mpp = SLIDES.at[wildcards.slide, "mpp"]
    return "" if mpp != mpp else f"--mpp {float(mpp)}"  # NaN: no override


def settings_json(*keys):
    """JSON of config sections, passed to `mrplip` and used as a rerun trigger (params)."""
    return json.dumps({k: config[k] for k in keys}, sort_keys=True)


WSI_SETTINGS = json.dumps(
    {
        "thumbnail_mpp": config["wsi"]["thumbnail_mpp"],
        "mpp_fallback": config["mpp_fallback"],
        "failures_fatal": config["failures_fatal"],
        "tissue": config["tissue"],
        "tiling": config["tiling"],
    },
    sort_keys=True,
)
