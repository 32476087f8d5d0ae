"""What one layer gets: a :class:`LayerScheme` (weight format plus a slot for input activations).

Schemes are validated data, built from what users write in a config (a format name or a dict of
fields) by :func:`scheme_from_value`, and saved as dicts. The activation slot stays ``None``
(weight-only) until activation quantization fills it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hfquant.formats import FORMAT_FIELD, WeightFormat, format_from_dict, make_format


@dataclass(frozen=True)
class LayerScheme:
    """A layer's quantization: its weight format; ``input`` is reserved for activation quantization."""

    weight: WeightFormat
    input: None = None

    @property
    def name(self) -> str:
        return self.weight.name

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> LayerScheme:
        if not isinstance(data, dict) or set(data) != {"weight"}:
            raise ValueError(f"a saved scheme must be {{'weight': {{...}}}}, got {data!r}")
        return cls(weight=format_from_dict(data["weight"]))


def scheme_from_value(value: Any, field: str) -> LayerScheme:
    """A scheme from a format name (its defaults) or a dict of format fields; errors name ``field``."""
    try:
        if isinstance(value, str):
            return LayerScheme(make_format(value))
        if isinstance(value, dict) and FORMAT_FIELD in value:
            return LayerScheme(format_from_dict(value))
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from None
    raise ValueError(f"{field}={value!r} is not allowed; expected a format name, a dict with a "
                     f"{FORMAT_FIELD!r} key and its fields, or None (keep the layer in full precision)")
