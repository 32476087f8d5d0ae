"""Activation modes: how a layer's *input* is quantized at run time (the ``input`` slot of a scheme).

Each mode is a registered :class:`ActivationMode` value: its name (what users write as
``activations=``), which weight formats it can be paired with, and how it rounds the input.

* ``int8-dynamic`` — per-token symmetric int8, computed at run time (no calibration data):
  for each row ``x`` of the flattened input, ``scale = max|x| / 127`` and
  ``codes = clamp(round(x / scale), -127, 127)``; an all-zero row gets scale 1 (codes 0).
  Paired with symmetric per-channel ``int8`` weights only, so the matmul is integer
  (``int8 × int8 → int32``) and dequantizes with ``x_scale · w_scale`` (see :mod:`hfquant.nn.kernels`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hfquant.formats import WeightFormat
from hfquant.formats.affine import IntAffine

INT8_MAX = 127


def quantize_per_token_int8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 codes (M, K), float32 scales (M, 1))`` with ``x ≈ codes · scale`` per row (symmetric)."""
    x = x2d.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    codes = torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def _int8_sym_per_channel(fmt: WeightFormat) -> bool:
    return isinstance(fmt, IntAffine) and fmt.bits == 8 and bool(fmt.sym) and fmt.group_size == -1


@dataclass(frozen=True)
class ActivationMode:
    """A way of quantizing a layer's input: ``quantize(x2d) -> (codes, per-row scales)``."""

    name: str
    takes: Callable[[WeightFormat], bool]  # which weight formats it pairs with
    allowed_weights: str  # ``takes`` in words, for error messages
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    def check_weight(self, fmt: WeightFormat, field: str = "activations") -> None:
        """``ValueError`` naming ``field`` unless this mode can run with weights of ``fmt``."""
        if not self.takes(fmt):
            raise ValueError(f"{field}={self.name!r} is not allowed with weight format {fmt.name!r}; "
                             f"{self.name!r} takes {self.allowed_weights}")


INT8_DYNAMIC = ActivationMode("int8-dynamic", takes=_int8_sym_per_channel,
                              allowed_weights="symmetric per-channel int8 weights "
                                              "(format='int8', group_size=-1, sym=True)",
                              quantize=quantize_per_token_int8)
ACTIVATION_MODES: dict[str, ActivationMode] = {m.name: m for m in (INT8_DYNAMIC,)}


def get_activation_mode(value: object, field: str = "activations") -> ActivationMode | None:
    """The registered mode named ``value`` (``None``: weight-only); ``ValueError`` naming ``field`` otherwise."""
    if value is None:
        return None
    if isinstance(value, str) and value in ACTIVATION_MODES:
        return ACTIVATION_MODES[value]
    raise ValueError(f"{field}={value!r} is not allowed; expected None (weight-only) or one of "
                     f"{tuple(ACTIVATION_MODES)}")
