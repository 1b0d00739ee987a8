"""The workflow's config schema (workflow/schemas/config.schema.yaml) from plain Python.

Three uses, none of which imports Snakemake:

* :func:`apply_schema_types`: values given as text (Snakemake's ``--config KEY=VALUE``
  hands nested values over as strings: ``tiling='{n_parents: 5}'`` arrives as
  ``{"n_parents": "5"}``) are read with the type the schema gives the key.
* :func:`check_section`: types, defaults and validation of one section outside Snakemake
  (``mrplip pretrain``, the ablations of rules/pretrain.smk), errors naming the key.
* :func:`load_schema` / :func:`section_schema`: the schema itself, the one home of every
  default of config.yaml.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

#: The schema file, in the repository that holds this package (editable install).
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"

#: JSON-schema type of each Python type a YAML scalar can have.
_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (type(None), "null"),
    (list, "array"), (dict, "object"),
)


@functools.lru_cache(maxsize=4)
def load_schema(path: str | Path | None = None) -> dict[str, Any]:
    """The config schema (read once; treat the result as read-only)."""
    path = Path(path) if path is not None else SCHEMA_PATH
    if not path.exists():
        raise FileNotFoundError(f"config schema {path} not found: mrplip_core reads it from its repository "
                                "(install the package with pip install -e .)")
    return yaml.safe_load(path.read_text())


def section_schema(name: str, path: str | Path | None = None) -> dict[str, Any]:
    """The schema of one top-level section, e.g. ``section_schema("pretrain")``."""
    properties = load_schema(path).get("properties", {})
    if name not in properties:
        raise KeyError(f"the config schema has no section {name!r}; it has {sorted(properties)}")
    return properties[name]


def apply_schema_types(value: Any, schema: Mapping[str, Any]) -> Any:
    """``value`` with every string read as the type ``schema`` gives its key.

    A string becomes an integer, a number, a boolean, null, a list or a mapping (parsed as
    YAML, then walked the same way) when the schema allows that type and not a string.
    Strings where the schema allows strings (or names this exact string in ``const`` /
    ``enum``) are kept, except that a key that may be null reads ``null``/``~``/empty as
    null. A string that reads as no allowed type is kept, so validation rejects it with
    the key named. Mappings and lists are walked along ``properties``,
    ``patternProperties``, ``additionalProperties`` and ``items``; nothing else changes.
    Returns new mappings and lists; ``value`` is not modified.
    """
    if isinstance(value, str):
        return _from_string(value, schema)
    if isinstance(value, Mapping):
        return {key: apply_schema_types(item, _property_schema(schema, str(key))) for key, item in value.items()}
    if isinstance(value, list):
        return [apply_schema_types(item, _items_schema(schema)) for item in value]
    return value


def check_section(values: Mapping[str, Any] | None, schema: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` typed (:func:`apply_schema_types`), completed with the schema's defaults
    and validated, as Snakemake's ``validate`` does for the whole config.

    Raises ``ValueError`` naming the key path under ``where`` (e.g. ``pretrain.train:
    Additional properties are not allowed ('stepz' was unexpected)``).
    """
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import best_match

    def fill_defaults(validator, properties, instance, schema):  # noqa: ANN001 (jsonschema hook)
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if isinstance(sub, Mapping) and "default" in sub:
                    instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from Draft202012Validator.VALIDATORS["properties"](validator, properties, instance, schema)

    filled = apply_schema_types(dict(values or {}), schema)
    validator = validators.extend(Draft202012Validator, {"properties": fill_defaults})(schema)
    error = best_match(validator.iter_errors(filled))
    if error is not None:
        key = ".".join([where, *(str(p) for p in error.absolute_path)])
        raise ValueError(f"{key}: {error.message}")
    return filled


def _from_string(text: str, schema: Mapping[str, Any]) -> Any:
    types: set[str] = set()
    for branch in _branches(schema):
        kind = branch.get("type")
        types.update([kind] if isinstance(kind, str) else kind or [])
        named = [branch["const"]] if "const" in branch else list(branch.get("enum", []))
        if text in named:
            return text
        types.update(_json_type(v) for v in named if not isinstance(v, str))
    if text.strip() in ("", "~", "null", "Null", "NULL") and "null" in types:
        return None
    if not types or "string" in types:
        return text
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(parsed, str) and "number" in types:  # YAML 1.1 reads 1e-4 as a string
        try:
            parsed = float(text)
        except ValueError:
            return text
    if not _allowed(parsed, types):
        return text
    return apply_schema_types(parsed, schema) if isinstance(parsed, (dict, list)) else parsed


def _allowed(value: Any, types: set[str]) -> bool:
    kind = _json_type(value)
    if kind == "integer":
        return bool(types & {"integer", "number"})
    if kind == "number":
        return "number" in types or ("integer" in types and float(value).is_integer())
    return kind in types


def _json_type(value: Any) -> str:
    return next((name for cls, name in _JSON_TYPES if isinstance(value, cls)), "unknown")


def _branches(schema: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """``schema`` and the alternatives it combines (oneOf, anyOf, allOf), depth first."""
    if not isinstance(schema, Mapping):
        return
    yield schema
    for key in ("oneOf", "anyOf", "allOf"):
        for branch in schema.get(key, []):
            yield from _branches(branch)


def _property_schema(schema: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    for branch in _branches(schema):
        if key in branch.get("properties", {}):
            return branch["properties"][key]
        for pattern, sub in branch.get("patternProperties", {}).items():
            if re.search(pattern, key):
                return sub
        if isinstance(branch.get("additionalProperties"), Mapping):
            return branch["additionalProperties"]
    return {}


def _items_schema(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    for branch in _branches(schema):
        if isinstance(branch.get("items"), Mapping):
            return branch["items"]
    return {}
