"""Quantization methods, registered by name.

A method is one module in this package that calls :func:`register_method` with a :class:`Method`:
its name, whether it needs calibration data, a dataclass of its own options (the keyword
arguments of :class:`hfquant.HfQuantConfig` beyond the format fields), and the paths it owns:

* ``quantize(weight, fmt, options)``: the data-free path. Uncalibrated methods run it on every
  weight while the checkpoint streams in; calibrated methods run it on layers outside the decoder
  blocks (no block inputs to calibrate on there).
* ``solver(options, formats)``, calibrated methods only: a layer-wise solver for the sequential
  engine (:mod:`hfquant.calibration.pipeline`), given each target layer's format.
* ``transform(options, formats, model_config)``, optional: a block transform the engine runs on each
  float decoder block before its layers are solved (AWQ's scale and clipping search).

The config validates options against the dataclass, so a new method is one file plus one registration.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hfquant.formats import QuantizedWeight, WeightFormat
from hfquant.validation import MAX_INT, require_bool, require_choice, require_float, require_int


@dataclass(frozen=True)
class Method:
    """A registered quantization method."""

    name: str
    calibrated: bool  # needs calibration data, runs after the weights are loaded
    options: type  # a dataclass of method-specific keyword options with defaults
    quantize: Callable[[torch.Tensor, WeightFormat, Any], QuantizedWeight]  # the data-free path
    solver: Callable[[Any, dict[str, WeightFormat]], Any] | None = None  # calibrated methods: a LayerwiseSolver
    # (options, formats, model config) -> a BlockTransform run on each float block before its layers are solved
    transform: Callable[[Any, dict[str, WeightFormat], Any], Any] | None = None
    description: str = ""  # one sentence for model cards
    applies_to: Callable[[WeightFormat], str | None] = lambda fmt: None  # why it cannot take a format, or None

    def check_format(self, fmt: WeightFormat) -> None:
        """``ValueError`` naming the method and the format when the method cannot quantize to ``fmt``."""
        problem = self.applies_to(fmt)
        if problem:
            raise ValueError(f"method={self.name!r} cannot quantize to {fmt.name!r}: {problem}")

    def __post_init__(self) -> None:
        _option_types(self.options)  # an unsupported annotation is a bug of the method: fail at registration

    def parse_options(self, given: dict[str, Any]) -> Any:
        """Build the options dataclass, rejecting names the method does not know and values whose type
        does not match the field's annotation (``ValueError`` naming the option; numpy scalars become
        Python ones). Ranges are the dataclass's own ``__post_init__`` checks, run afterwards."""
        types = _option_types(self.options)
        unknown = sorted(set(given) - set(types))
        if unknown:
            raise ValueError(f"method={self.name!r} does not take option(s) {unknown}; "
                             f"its options are {sorted(types) or 'none'}")
        return self.options(**{name: check_option(name, value, types[name]) for name, value in given.items()})


def _option_types(options: type) -> dict[str, Any]:
    """``{field: annotation}`` of an options dataclass; each must be ``bool``, ``int``, ``float`` or a
    ``Literal[...]`` of choices, optionally ``| None``."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options={options!r} must be a dataclass")
    hints = typing.get_type_hints(options)
    types = {}
    for field in dataclasses.fields(options):
        annotation = hints[field.name]
        base, _ = _split_optional(annotation)
        if not (base in (bool, int, float) or typing.get_origin(base) is typing.Literal):
            raise TypeError(f"option {field.name!r} of {options.__name__} is annotated {annotation!r}; supported: "
                            "bool, int, float or Literal[...], each optionally | None")
        types[field.name] = annotation
    return types


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None`` / ``Optional[X]``, else ``(annotation, False)``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1 and len(members) < len(typing.get_args(annotation)):
            return members[0], True
    return annotation, False


def check_option(name: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` (see :func:`_option_types`) and normalised; ``ValueError``
    naming ``name`` otherwise: a bool is only ``True``/``False``, an int is not a bool, a float is a finite
    real number (ints accepted) and not a bool, ``None`` only where the annotation allows it."""
    base, optional = _split_optional(annotation)
    if value is None and optional:
        return None
    if base is bool:
        return require_bool(name, value)
    if base is int:
        return require_int(name, value, minimum=-MAX_INT - 1)
    if base is float:
        return require_float(name, value, -math.inf, math.inf)
    return require_choice(name, value, typing.get_args(base))


class DataFreeSolver:
    """A method's data-free path as a layer-wise solver for the sequential engine, for runs that need the engine
    for something else (a block transform): each layer is quantized from its weight alone, so the engine
    skips observing inputs (``observes = False``)."""

    observes = False

    def __init__(self, quantize: Callable[[torch.Tensor, WeightFormat, Any], QuantizedWeight], options: Any,
                 formats: dict[str, WeightFormat]) -> None:
        self.quantize, self.options, self.formats = quantize, options, formats

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        raise RuntimeError("DataFreeSolver takes no inputs (observes = False)")

    def solve(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        return self.quantize(weight, self.formats[name], self.options)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry; names are unique."""
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"method={name!r} is not allowed; expected one of {sorted(_METHODS)}")
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)


from hfquant.algorithms import awq, gptq, hqq, rtn  # noqa: E402,F401  (registers the built-in methods)
