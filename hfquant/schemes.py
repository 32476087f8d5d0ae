"""What one layer gets: a :class:`LayerScheme` (weight format plus a slot for input activations).

Schemes are validated data, built from what users write in a config (a format name or a dict of
fields) by :func:`scheme_from_value`, and saved as dicts. The ``input`` slot is ``None``
(weight-only) or a registered :class:`~hfquant.activations.ActivationMode`, saved by name
(``{"weight": {...}, "input": "int8-dynamic"}``); saved schemes without ``input`` are weight-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hfquant.activations import ActivationMode, get_activation_mode
from hfquant.formats import FORMAT_FIELD, WeightFormat, format_from_dict, make_format


@dataclass(frozen=True)
class LayerScheme:
    """A layer's quantization: its weight format and how its input is quantized (``None``: not at all)."""

    weight: WeightFormat
    input: ActivationMode | None = None

    def __post_init__(self) -> None:
        if self.input is not None:
            self.input.check_weight(self.weight)

    def input_specs(self) -> dict:
        """The stored tensors the input mode adds to a layer (e.g. ``input_scale``); ``{}`` for none."""
        return {} if self.input is None else self.input.specs()

    @property
    def name(self) -> str:
        return self.weight.name if self.input is None else f"{self.weight.name}+{self.input.name}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weight": self.weight.to_dict()}
        if self.input is not None:
            out["input"] = self.input.name
        return out

    @classmethod
    def from_dict(cls, data: Any) -> LayerScheme:
        if not isinstance(data, dict) or "weight" not in data or not set(data) <= {"weight", "input"}:
            raise ValueError(f"a saved scheme must be {{'weight': {{...}}, 'input': mode name (optional)}}, "
                             f"got {data!r}")
        return cls(weight=format_from_dict(data["weight"]), input=get_activation_mode(data.get("input"), "input"))


ACTIVATIONS_FIELD = "activations"  # the key of a rule's dict (and the config field) naming the input mode


def scheme_from_value(value: Any, field: str) -> LayerScheme:
    """A scheme from a format name (its defaults) or a dict of format fields (plus optional
    ``activations``: a mode name); errors name ``field``."""
    try:
        if isinstance(value, str):
            return LayerScheme(make_format(value))
        if isinstance(value, dict) and FORMAT_FIELD in value:
            fields = {k: v for k, v in value.items() if k != ACTIVATIONS_FIELD}
            return LayerScheme(format_from_dict(fields), get_activation_mode(value.get(ACTIVATIONS_FIELD)))
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from None
    raise ValueError(f"{field}={value!r} is not allowed; expected a format name, a dict with a "
                     f"{FORMAT_FIELD!r} key and its fields, or None (keep the layer in full precision)")
