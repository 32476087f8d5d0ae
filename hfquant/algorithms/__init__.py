"""Quantization methods, registered by name.

A method is one module in this package that calls :func:`register_method` with a :class:`Method`:
its name, whether it needs calibration data, a dataclass of its own options (the keyword
arguments of :class:`hfquant.HfQuantConfig` beyond the format fields), and the paths it owns:

* ``quantize(weight, fmt, options)``: the data-free path. Uncalibrated methods run it on every
  weight while the checkpoint streams in; calibrated methods run it on layers outside the decoder
  blocks (no block inputs to calibrate on there).
* ``solver(options, formats)``, calibrated methods only: a layer-wise solver for the sequential
  engine (:mod:`hfquant.calibration.pipeline`), given each target layer's format.

The config validates options against the dataclass, so a new method is one file plus one registration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hfquant.formats import QuantizedWeight, WeightFormat


@dataclass(frozen=True)
class Method:
    """A registered quantization method."""

    name: str
    calibrated: bool  # needs calibration data, runs after the weights are loaded
    options: type  # a dataclass of method-specific keyword options with defaults
    quantize: Callable[[torch.Tensor, WeightFormat, Any], QuantizedWeight]  # the data-free path
    solver: Callable[[Any, dict[str, WeightFormat]], Any] | None = None  # calibrated methods: a LayerwiseSolver
    description: str = ""  # one sentence for model cards

    def parse_options(self, given: dict[str, Any]) -> Any:
        """Build the options dataclass, rejecting names the method does not know."""
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"method={self.name!r} does not take option(s) {unknown}; "
                             f"its options are {sorted(known) or 'none'}")
        return self.options(**given)


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


from hfquant.algorithms import gptq, rtn  # noqa: E402,F401  (registers the built-in methods)
