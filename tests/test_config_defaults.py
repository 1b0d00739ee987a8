"""One home for each default: workflow/schemas/config.schema.yaml.

config.yaml, the schema and the settings dataclasses that `mrplip` verbs read are held
against each other; every difference is reported as a key path, all of them at once.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from mrplip_core.captions.settings import CaptionSettings
from mrplip_core.config_mapping import to_plain
from mrplip_core.config_schema import check_section, load_schema, section_schema
from mrplip_core.encoders import get_spec
from mrplip_core.encoders.catalog import DEFAULT_IMAGE_ENCODER
from mrplip_core.evaluation.settings import EvaluationSettings
from mrplip_core.features.settings import FeatureSettings
from mrplip_core.pathflip.settings import TRAINING_KEYS, PathflipSettings
from mrplip_core.train.config import PretrainConfig, load_config, resolve_loss
from mrplip_core.train.pathflip_config import PathflipTrainConfig, load_pathflip_config, resolve_pathflip_loss
from mrplip_core.use.settings import LocalizeSettings
from mrplip_core.wsi.tiling import TilesSettings

NO_DEFAULT = "<no default>"
ABSENT = "<absent>"


def schema_leaves(schema: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Key path -> default (or NO_DEFAULT) of every leaf property under ``schema``.

    Objects with ``properties`` are walked; a mapping of named entries (``additionalProperties``
    with ``properties``, e.g. evaluation.datasets) is walked as ``path.*``.
    """
    out: dict[str, Any] = {}
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}.{key}"
        entries = sub.get("additionalProperties")
        if "properties" in sub:
            out.update(schema_leaves(sub, path))
        elif isinstance(entries, Mapping) and "properties" in entries:
            out.update(schema_leaves(entries, path + ".*"))
        else:
            out[path] = sub.get("default", NO_DEFAULT)
    return out


def dataclass_leaves(cls: type, prefix: str, open_mappings: Mapping[str, Mapping[str, Any]] = {}) -> dict[str, Any]:
    """Key path -> default (or NO_DEFAULT) of every field of ``cls``, nested settings walked.

    A field holding a tuple of dataclasses is a mapping of named entries (``path.*``, its
    ``name`` field being the key). ``open_mappings``: path -> resolved default of fields that
    are plain mappings filled elsewhere (pretrain.loss), walked like the schema.
    """
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}"
        kind = hints[f.name]
        entry = next((a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)), None)
        if dataclasses.is_dataclass(kind):
            out.update(dataclass_leaves(kind, path, open_mappings))
        elif entry is not None:
            out.update({k: v for k, v in dataclass_leaves(entry, path + ".*").items() if k != f"{path}.*.name"})
        elif path in open_mappings:
            out.update(_flatten(open_mappings[path], path))
        elif f.default is not dataclasses.MISSING:
            out[path] = to_plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[path] = to_plain(f.default_factory())
        else:
            out[path] = NO_DEFAULT
    return out


def _flatten(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}.{key}"
        out.update(_flatten(value, path) if isinstance(value, Mapping) and value else {path: to_plain(value)})
    return out


def differences(schema: dict[str, Any], code: dict[str, Any], open_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Key paths where the schema and the dataclasses disagree. Under ``open_prefixes`` a
    schema key without a default may be absent from the code (an optional keyword)."""
    out = []
    for path in sorted(set(schema) | set(code)):
        s, c = schema.get(path, ABSENT), code.get(path, ABSENT)
        if s is ABSENT:
            out.append(f"{path}: a dataclass field with no schema property")
        elif c is ABSENT:
            if not (s == NO_DEFAULT and path.startswith(open_prefixes)):
                out.append(f"{path}: a schema property with no dataclass field")
        elif s != c or isinstance(s, bool) != isinstance(c, bool):
            out.append(f"{path}: schema default {s!r}, dataclass default {c!r}")
    return out


@pytest.fixture(scope="module")
def schema():
    return load_schema()


#: Keys of config.yaml whose value is this project's content, not a default: the demo slides,
#: the shipped ablation and the shipped evaluation tile sets (their keys are still checked).
CONTENT = ("demo", "ablations", "evaluation.datasets", "evaluation.slides.labels")


def test_every_key_of_config_yaml_has_the_schema_default(repo_root, schema):
    config = yaml.safe_load((repo_root / "config.yaml").read_text())
    found = []

    def walk(values: Any, sub: Mapping[str, Any], path: str) -> None:
        if not isinstance(values, Mapping):
            return
        props, entries = sub.get("properties"), sub.get("additionalProperties")
        for key, value in values.items():
            where = f"{path}.{key}" if path else key
            if where == "ablations" or path == "ablations":
                child = {**schema["properties"]["pretrain"], "default": NO_DEFAULT} if path else props[key]
            elif props is not None and key in props:
                child = props[key]
            elif isinstance(entries, Mapping):  # an entry of a mapping of named entries
                child = {**entries, "default": NO_DEFAULT}
            elif props is not None or entries is False:
                found.append(f"{where}: in config.yaml, not in the schema")
                continue
            else:  # a free-form mapping
                continue
            walk(value, child, where)
            default = child.get("default", NO_DEFAULT)
            compared = "properties" not in child and not where.startswith(CONTENT)  # objects: by their keys
            if compared and default != NO_DEFAULT and (default != value or isinstance(default, bool) != isinstance(value, bool)):
                found.append(f"{where}: config.yaml {value!r}, schema default {default!r}")

    walk(config, schema, "")
    assert found == [], "\n".join(found)


def test_dataclasses_mirror_the_schema(schema):
    props = schema["properties"]
    sections = {
        "pretrain": (PretrainConfig, props["pretrain"], {"pretrain.loss": resolve_loss({})}),
        "features": (FeatureSettings, {"properties": {**props["features"]["properties"],
                                                      "failures_fatal": props["failures_fatal"]}}, {}),
        "captions": (CaptionSettings, props["captions"], {}),
        "evaluation": (EvaluationSettings, props["evaluation"], {}),
        "localize": (LocalizeSettings, props["localize"], {}),
        # the sub-captions stage's keys, and the training run's (typed a layer up)
        "pathflip": (PathflipSettings, {"properties": {k: v for k, v in props["pathflip"]["properties"].items()
                                                       if k not in TRAINING_KEYS}}, {}),
        "pathflip_run": (PathflipTrainConfig, {"properties": {k: v for k, v in props["pathflip"]["properties"].items()
                                                              if k in TRAINING_KEYS}},
                         {"pathflip_run.loss": resolve_pathflip_loss({})}),
        # the tiles stage reads wsi.thumbnail_mpp, two top-level keys, tissue and tiling
        "tiles": (TilesSettings, {"properties": {"thumbnail_mpp": props["wsi"]["properties"]["thumbnail_mpp"],
                                                 "mpp_fallback": props["mpp_fallback"],
                                                 "failures_fatal": props["failures_fatal"],
                                                 "tissue": props["tissue"], "tiling": props["tiling"]}}, {}),
    }
    found = []
    for name, (cls, sub, mappings) in sections.items():
        found += differences(schema_leaves(sub, name), dataclass_leaves(cls, name, mappings),
                             open_prefixes=("pretrain.loss.",))
    assert found == [], "\n".join(found)


def test_the_schema_fills_what_the_dataclasses_default_to():
    filled = check_section({}, section_schema("pretrain"), "pretrain")
    assert PretrainConfig.from_dict(filled).to_dict() == filled == PretrainConfig.from_dict({}).to_dict()
    assert load_config().to_dict() == filled  # `mrplip pretrain` without a config: the same defaults
    assert FeatureSettings.from_dict(check_section({}, section_schema("features"), "features")) == FeatureSettings()
    filled = check_section({}, section_schema("pathflip"), "pathflip")
    assert PathflipTrainConfig.from_dict(filled) == PathflipTrainConfig.from_dict({}) == load_pathflip_config()


def test_the_default_image_encoder_is_defined_once(schema):
    props = schema["properties"]
    assert props["features"]["properties"]["image_encoder"]["default"] == DEFAULT_IMAGE_ENCODER
    assert props["pretrain"]["properties"]["data"]["properties"]["image_encoder"]["default"] == DEFAULT_IMAGE_ENCODER
    assert get_spec(DEFAULT_IMAGE_ENCODER).kind == "image"


def test_standalone_pretrain_trains_on_the_features_the_config_extracts(repo_root, tmp_path):
    config = yaml.safe_load((repo_root / "config.yaml").read_text())
    assert load_config(repo_root / "config.yaml").to_dict() == check_section(config["pretrain"], section_schema("pretrain"),
                                                                             "pretrain")
    config["features"]["image_encoder"] = "uni"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_config(tmp_path / "config.yaml").data.image_encoder == "uni"
    config["pretrain"]["data"]["image_encoder"] = "quiltnet"  # given in the section: kept
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_config(tmp_path / "config.yaml").data.image_encoder == "quiltnet"


@dataclasses.dataclass
class _Inner:
    a: int = 1


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    b: bool = False
    extra: str = "x"


def test_differences_are_reported_as_key_paths():
    sub = {"properties": {"inner": {"properties": {"a": {"default": 2}}}, "b": {"default": 0}, "c": {"default": 3}}}
    assert differences(schema_leaves(sub, "s"), dataclass_leaves(_Outer, "s")) == [
        "s.b: schema default 0, dataclass default False",
        "s.c: a schema property with no dataclass field",
        "s.extra: a dataclass field with no schema property",
        "s.inner.a: schema default 2, dataclass default 1",
    ]
