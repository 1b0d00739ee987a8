# Helpers shared by every stage: config validation, the slide table, the layout and the plans.
# Logic lives in mrplip_core; this file only connects it to Snakemake. Every result path comes
# from LAYOUT (mrplip_core/layout.py); what each stage runs, and what reruns it, from its plan.
import os
import shlex
import sys

from snakemake.utils import validate

import mrplip_core
from mrplip_core.config_schema import apply_schema_types, load_schema
from mrplip_core.captions.plan import CaptionsPlan
from mrplip_core.features.plan import FeaturesPlan
from mrplip_core.pathflip.plan import SubcaptionsPlan
from mrplip_core.jobs import shards_holding
from mrplip_core.layout import Layout
from mrplip_core.wsi.plan import TilesPlan
from mrplip_core.wsi.table import SLIDE_ID_PATTERN, read_slide_table

CONFIG_SCHEMA = os.path.join(workflow.basedir, "schemas", "config.schema.yaml")
# `--config tiling='{n_parents: 5}'` hands Snakemake "5": read such values with the schema's types.
config.update(apply_schema_types(config, load_schema(CONFIG_SCHEMA)))
validate(config, "../workflow/schemas/config.schema.yaml")

SLIDES = read_slide_table(config["slides"])
SLIDE_IDS = list(SLIDES.index)
LAYOUT = Layout()
VERSION = mrplip_core.__version__

TILES_PLAN = TilesPlan.from_config(config)
CAPTIONS_PLAN = CaptionsPlan.from_config(config)
FEATURES_PLAN = FeaturesPlan.from_config(config)
SUBCAPTIONS_PLAN = SubcaptionsPlan.from_config(config)

# The rules call the library through the Python that runs Snakemake (the project venv),
# so they work whether or not the venv is activated.
MRPLIP = f"{shlex.quote(sys.executable)} -m mrplip_core"

DEMO = {d["name"]: d for d in config.get("demo", [])}


def shard_rules(stage, shards):
    """Yield (rule name ``{stage}_shard_{i}``, shard index ``i`` as a string, slide ids, ids quoted
    for the shell) for each shard of ``stage``; define the shard's rule in the loop body.

    The profile's ``set-resources`` / ``set-threads`` entry ``{stage}_shard`` is given to each
    shard rule: Snakemake matches entries by exact rule name and applies them when a rule is
    defined, so the entry is copied under each name before the loop and removed after it. Left
    in place, 200 shards x 5 stages of copies would be passed to every Slurm job as
    ``--set-resources`` and overflow its command line (E2BIG)."""
    names = [f"{stage}_shard_{i}" for i in range(len(shards))]
    entry = f"{stage}_shard"
    added = []
    settings = getattr(workflow, "resource_settings", None)
    for table in ("_parsed_overwrite_resources", "_parsed_overwrite_threads"):
        parsed = getattr(settings, table, None)
        if isinstance(parsed, dict) and entry in parsed:
            new = [name for name in names if name not in parsed]
            for name in new:
                parsed[name] = parsed[entry]
            added += [(parsed, name) for name in new]
    for i, (name, ids) in enumerate(zip(names, shards)):
        yield name, str(i), ids, " ".join(shlex.quote(s) for s in ids)
    for parsed, name in added:
        parsed.pop(name, None)


_SHARDS = {}


def _shards_of(plan):
    key = id(plan)
    if key not in _SHARDS:
        _SHARDS[key] = plan.shards(SLIDE_IDS)
    return _SHARDS[key]


# The per-slide artifacts of each stage's jobs, the plan that cuts the stage into jobs, and the
# marker a shard job of that stage writes once all its slides are done.
STAGES = {
    "tiles": (TILES_PLAN, "tiles_shard", ("tiles", "slide_record", "tissue_geojson", "tissue_qc")),
    "captions": (CAPTIONS_PLAN, "captions_shard", ("captions",)),
    "keywords": (CAPTIONS_PLAN, "keywords_shard", ("keywords",)),
    "image_features": (FEATURES_PLAN, "image_features_shard", ("image_features",)),
    "text_features": (FEATURES_PLAN, "text_features_shard", ("text_features",)),
    "subcaptions": (SUBCAPTIONS_PLAN, "subcaptions_shard", ("subcaptions",)),
}
STAGE_OF = {name: stage for stage, (_, _, names) in STAGES.items() for name in names}
_MISSING = {}


def _missing_after_marker(stage, **fixed):
    """Slide -> its outputs of ``stage`` that are missing although their shard's marker exists
    (deleted by hand, or lost): asking for them makes Snakemake rerun that shard's job."""
    key = (stage, tuple(sorted(fixed.items())))
    if key not in _MISSING:
        plan, marker, names = STAGES[stage]
        missing = {}
        for i, ids in enumerate(_shards_of(plan)):
            if os.path.exists(LAYOUT.path(marker, shard=str(i), **fixed)):
                for sid in ids:
                    gone = [p for p in (str(LAYOUT.path(n, slide=sid, **fixed)) for n in names) if not os.path.exists(p)]
                    if gone:
                        missing[sid] = gone
        _MISSING[key] = missing
    return _MISSING[key]


def _sharded(stage, **fixed):
    """Whether ``stage`` runs in shard jobs here (features of an encoder other than
    features.image_encoder are made per slide)."""
    other_encoder = stage == "image_features" and fixed.get("encoder") != FEATURES_PLAN.image_encoder
    return not (STAGES[stage][0].per_slide or other_encoder)


def stage_files(name, slide_ids, **fixed):
    """What a job that reads per-slide artifact ``name`` of ``slide_ids`` waits for: each slide's
    file when its stage runs a job per slide, else the marker of every shard job holding them
    (written once the whole shard is done). Waiting on markers keeps the plan of a
    20,000-slide cohort small: Snakemake looks up a few hundred files per stage, not 20,000."""
    stage = STAGE_OF[name]
    plan, marker, _ = STAGES[stage]
    if not _sharded(stage, **fixed):
        return LAYOUT.expand(name, slide=slide_ids, **fixed)
    return LAYOUT.expand(marker, shard=[str(i) for i in shards_holding(slide_ids, _shards_of(plan))], **fixed)


def stage_target(stage, **fixed):
    """A stage target's inputs (rules tiles, captions, features and so all): the stage's files of
    every slide, and, in shard jobs, any slide's output that went missing after its shard was
    done, so that deleting a slide's file and running the target rebuilds it (its shard job
    reruns). Only the targets ask for those: a rule with outputs would see its set of inputs
    change and rerun once more."""
    plan, marker, names = STAGES[stage]
    files = stage_files(names[0], SLIDE_IDS, **fixed)
    if _sharded(stage, **fixed):
        files += [p for paths in _missing_after_marker(stage, **fixed).values() for p in paths]
    return files


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


def slide_files(slide_ids):
    """The slide files of ``slide_ids`` as job inputs, leaving out missing ones.

    A missing file is not a DAG error: the tiles job runs and records it as failed, so
    the rest of the cohort finishes. Demo slides are made by rule demo_slide.
    """
    files = []
    for sid in slide_ids:
        path = _workdir_relative(SLIDES.at[sid, "path"])
        stem = os.path.splitext(os.path.basename(path))[0]
        is_demo = stem in DEMO and path == f"demo/{stem}.tiff"
        if is_demo or os.path.exists(path):
            files.append(path)
    return files
