"""The encoder registry: name -> :class:`EncoderSpec`.

Entries are registered by :mod:`mrplip_core.encoders.catalog` (imported by the package).
Importing the registry never imports torch: Snakemake reads the names when it parses rules.
"""

from __future__ import annotations

from mrplip_core.encoders.spec import EncoderSpec, Kind

_REGISTRY: dict[str, EncoderSpec] = {}


class UnknownEncoderError(KeyError):
    """An encoder name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable
        return str(self.args[0])


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Add ``spec`` to the registry; a second entry with the same name is an error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"encoder {spec.name!r} is already registered")
    if spec.embed_dim <= 0:
        raise ValueError(f"encoder {spec.name!r}: embed_dim must be positive")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> EncoderSpec:
    """The spec registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownEncoderError(
            f"unknown encoder {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_encoders(kind: Kind | None = None) -> list[str]:
    """Registered names, sorted; only those of ``kind`` ("image" or "text") when given."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)
