"""Zero-shot prompt sets: per-class synonyms x templates, read from JSON.

File format (see ``evaluation/prompts/*.json``)::

    {
      "dataset": "free text",
      "templates": ["an H&E image of {name}.", "{name}.", ...],
      "classes": {"ADI": ["adipose tissue", "fat"], "TUM": ["tumor", ...], ...}
    }

Keys of ``classes`` are the dataset's labels. Every synonym goes into every template
(``{name}`` is replaced); a class's zero-shot embedding is the mean of its prompts'
L2-normalised text embeddings (:func:`mrplip_core.evaluation.zeroshot.class_embeddings`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDER = "{name}"


class PromptError(ValueError):
    """A prompt file that cannot be used (the message names the file and the problem)."""


@dataclass(frozen=True)
class PromptSet:
    """Templates and per-label synonyms of one dataset."""

    templates: tuple[str, ...]
    classes: dict[str, tuple[str, ...]]  # label -> synonyms
    source: str = ""  # file it was read from

    @classmethod
    def read(cls, path: str | Path) -> PromptSet:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PromptError(f"prompt file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "") -> PromptSet:
        where = source or "prompt set"
        templates = raw.get("templates")
        classes = raw.get("classes")
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
            raise PromptError(f"{where}: 'templates' must be a non-empty list of strings")
        bad = [t for t in templates if PLACEHOLDER not in t]
        if bad:
            raise PromptError(f"{where}: templates without {PLACEHOLDER}: {bad}")
        if not isinstance(classes, dict) or not classes:
            raise PromptError(f"{where}: 'classes' must map each label to a list of names")
        out: dict[str, tuple[str, ...]] = {}
        for label, names in classes.items():
            if isinstance(names, str):
                names = [names]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise PromptError(f"{where}: class {label!r} needs a non-empty list of names")
            out[str(label)] = tuple(n.strip() for n in names)
        return cls(tuple(templates), out, source)

    def check_labels(self, labels: Sequence[str]) -> list[str]:
        """Every dataset label must have names; returns the prompt classes no label uses (a
        prompt file written for a larger label set, e.g. NCT-CRC's nine classes on a tile set
        without BACK: zero-shot then chooses among the dataset's own labels only)."""
        missing = sorted(set(labels) - set(self.classes))
        if missing:
            raise PromptError(f"{self.source or 'prompt set'}: no prompts for the label(s) {missing} "
                              f"(its classes: {sorted(self.classes)})")
        return sorted(set(self.classes) - set(labels))

    def prompts(self, label: str) -> list[str]:
        """Every synonym of ``label`` in every template (synonym-major order)."""
        return [t.replace(PLACEHOLDER, name) for name in self.classes[label] for t in self.templates]

    def n_prompts(self, label: str) -> int:
        return len(self.classes[label]) * len(self.templates)
