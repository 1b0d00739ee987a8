"""Strict conversion between config sections (plain YAML/JSON mappings) and frozen dataclasses.

Used by every typed settings class (``pretrain.*``, ``evaluation.*``): an unknown key is an
error that names it and lists the known ones, so a typo never falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from a plain mapping.

    Unknown keys, missing required keys and wrong call signatures are a ``ValueError`` that
    names ``section``. Lists become tuples where the field is annotated as a tuple (YAML has
    no tuples).
    """
    if values is not None and not isinstance(values, Mapping):
        raise ValueError(f"{section}: expected a mapping of keys to values, got {type(values).__name__} {values!r}")
    values = dict(values or {})
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key(s) in {section}: {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):  # type: ignore[arg-type]
        if isinstance(values.get(f.name), list) and "tuple" in str(hints[f.name]):
            values[f.name] = tuple(values[f.name])
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"{section}: {exc}") from None


def to_plain(obj: Any) -> Any:
    """Dataclass -> plain dicts and lists (YAML/JSON types; tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj
