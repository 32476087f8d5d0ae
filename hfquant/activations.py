"""Activation modes: how a layer's *input* is quantized at run time (the ``input`` slot of a scheme).

Each mode is a registered :class:`ActivationMode` value: its name (what users write as
``activations=``), which weight formats it can be paired with, how it rounds the input, which
weight codes the matmul multiplies it with, and what it adds to a layer: stored tensors
(``stored``, saved and checked at load like the weight's) and whether they come from calibration
data (``calibrated``). Every mode computes ``y = (x_codes @ w_codes.T) · x_scale · w_scale``.

* ``int8-dynamic`` — per-token symmetric int8, computed at run time (no calibration data):
  for each row ``x`` of the flattened input, ``scale = max|x| / 127`` and
  ``codes = clamp(round(x / scale), -127, 127)``; an all-zero row gets scale 1 (codes 0).
* ``int8-static`` — per-tensor symmetric int8 with a scale calibrated ahead of time
  (:mod:`hfquant.calibration.observers`) and stored as the layer's ``input_scale`` (float32, one
  value): ``codes = clamp(round(x / input_scale), -127, 127)``; values beyond the calibrated
  range are clipped. A per-*input-channel* scale would not factor out of the integer sum over
  input channels, so it is not offered (that is what SmoothQuant folds into the weights).
* ``fp8-dynamic`` — per-token float8 e4m3: ``scale = max|x| / 448`` (an all-zero row: 1),
  ``codes = fp8(clamp(x / scale, ±448))``, paired with per-channel ``fp8-e4m3`` weights.

The int8 modes pair with symmetric per-channel ``int8`` weights only (the matmul is integer,
``int8 × int8 → int32``, with the centered weight codes ``q - 128``); see :mod:`hfquant.nn.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hfquant.formats import WeightFormat
from hfquant.formats.affine import IntAffine
from hfquant.formats.base import TensorSpec
from hfquant.formats.fp8 import FP8

Tensors = dict[str, torch.Tensor]
INT8_MAX = 127
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
INPUT_SCALE = "input_scale"  # the stored tensor of int8-static


def _per_row_scale(x: torch.Tensor, top: float) -> torch.Tensor:
    amax = x.abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))


def quantize_per_token_int8(x2d: torch.Tensor, _stored: Tensors | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 codes (M, K), float32 scales (M, 1))`` with ``x ≈ codes · scale`` per row (symmetric)."""
    x = x2d.float()
    scale = _per_row_scale(x, INT8_MAX)
    codes = torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def quantize_per_tensor_int8(x2d: torch.Tensor, stored: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 codes (M, K), float32 scale (1, 1))`` on the stored ``input_scale`` grid (clipping outside it)."""
    scale = stored[INPUT_SCALE].float().reshape(1, 1)
    codes = torch.clamp(torch.round(x2d.float() / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def quantize_per_token_fp8(x2d: torch.Tensor, _stored: Tensors | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float8_e4m3fn codes (M, K), float32 scales (M, 1))`` with ``x ≈ codes · scale`` per row."""
    x = x2d.float()
    scale = _per_row_scale(x, E4M3_MAX)
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def int8_scale_for_range(clip: float) -> Tensors:
    """The stored ``input_scale`` of an input clipped to ``[-clip, clip]`` (an all-zero input: 1)."""
    return {INPUT_SCALE: torch.tensor([clip / INT8_MAX if clip > 0 else 1.0], dtype=torch.float32)}


def centered_int8_codes(stored: Tensors, fmt: WeightFormat, in_features: int) -> torch.Tensor:
    """``int8 (out, in)`` weight codes minus the symmetric zero point 128 (``w = codes · scale``)."""
    codes = fmt.unpack_codes(stored["weight"])[:, :in_features]
    return (codes.to(torch.uint8) ^ 0x80).view(torch.int8)  # q - 128, two's complement


def int8_weight_operand(stored: Tensors, fmt: WeightFormat, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centered int8 weight codes ``(out, in)`` and float32 per-channel scales ``(1, out)``."""
    return centered_int8_codes(stored, fmt, in_features), fmt.affine(fmt.stored_params(stored))[0].reshape(1, -1)


def fp8_weight_operand(stored: Tensors, fmt: WeightFormat, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weight codes ``(out, in)`` and float32 per-channel scales ``(1, out)``."""
    codes = fmt.unpack_codes(stored["weight"])[:, :in_features].to(torch.uint8).view(torch.float8_e4m3fn)
    return codes, fmt.stored_params(stored)["scale"].float().reshape(1, -1)


def _int8_sym_per_channel(fmt: WeightFormat) -> bool:
    return isinstance(fmt, IntAffine) and fmt.bits == 8 and bool(fmt.sym) and fmt.group_size == -1


def _fp8_e4m3_per_channel(fmt: WeightFormat) -> bool:
    return isinstance(fmt, FP8) and fmt.variant == "e4m3" and fmt.group_size == -1


@dataclass(frozen=True)
class ActivationMode:
    """A way of quantizing a layer's input: ``quantize(x2d, the layer's input tensors) -> (codes, scales)``."""

    name: str
    takes: Callable[[WeightFormat], bool]  # which weight formats it pairs with
    allowed_weights: str  # ``takes`` in words, for error messages
    quantize: Callable[[torch.Tensor, Tensors], tuple[torch.Tensor, torch.Tensor]]
    weight_operand: Callable[[Tensors, WeightFormat, int], tuple[torch.Tensor, torch.Tensor]]
    stored: tuple[tuple[str, TensorSpec], ...] = ()  # tensors it adds to a layer (name, spec)
    calibrated: bool = False  # its stored tensors are chosen from calibration data
    tensors_for_range: Callable[[float], Tensors] | None = None  # calibrated modes: stored tensors for a clip value
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types its reference path runs on (float64 sums)

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self.stored)

    def check_weight(self, fmt: WeightFormat, field: str = "activations") -> None:
        """``ValueError`` naming ``field`` unless this mode can run with weights of ``fmt``."""
        if not self.takes(fmt):
            raise ValueError(f"{field}={self.name!r} is not allowed with weight format {fmt.name!r}; "
                             f"{self.name!r} takes {self.allowed_weights}")

    def check_device(self, device: torch.device | str) -> str | None:
        """Why this mode cannot run on ``device`` (None: it can)."""
        kind = torch.device(device).type
        if kind in self.devices or kind == "meta":
            return None
        return f"activations={self.name!r} cannot run on device {kind!r}; it runs on {list(self.devices)}"

    def check_stored(self, tensors: Tensors) -> str | None:
        """What is wrong with a layer's loaded input tensors (missing, dtype/shape, non-finite or
        non-positive values), or None."""
        for key, spec in self.stored:
            tensor = tensors.get(key)
            if tensor is None:
                return f"tensor {key!r} is missing"
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                return (f"tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, "
                        f"activations={self.name!r} stores {str(spec.dtype).removeprefix('torch.')} {spec.shape}")
            if tensor.device.type != "meta" and not bool((torch.isfinite(tensor) & (tensor > 0)).all()):
                return f"{key} has non-finite or non-positive values"
        return None


_INT8_WEIGHTS = "symmetric per-channel int8 weights (format='int8', group_size=-1, sym=True)"
INT8_DYNAMIC = ActivationMode("int8-dynamic", takes=_int8_sym_per_channel, allowed_weights=_INT8_WEIGHTS,
                              quantize=quantize_per_token_int8, weight_operand=int8_weight_operand)
INT8_STATIC = ActivationMode("int8-static", takes=_int8_sym_per_channel, allowed_weights=_INT8_WEIGHTS,
                             quantize=quantize_per_tensor_int8, weight_operand=int8_weight_operand,
                             stored=((INPUT_SCALE, TensorSpec((1,), torch.float32)),), calibrated=True,
                             tensors_for_range=int8_scale_for_range)
FP8_DYNAMIC = ActivationMode("fp8-dynamic", takes=_fp8_e4m3_per_channel,
                             allowed_weights="per-channel fp8-e4m3 weights (format='fp8', group_size=-1)",
                             quantize=quantize_per_token_fp8, weight_operand=fp8_weight_operand)
ACTIVATION_MODES: dict[str, ActivationMode] = {m.name: m for m in (INT8_DYNAMIC, INT8_STATIC, FP8_DYNAMIC)}


def get_activation_mode(value: object, field: str = "activations") -> ActivationMode | None:
    """The registered mode named ``value`` (``None``: weight-only); ``ValueError`` naming ``field`` otherwise."""
    if value is None:
        return None
    if isinstance(value, str) and value in ACTIVATION_MODES:
        return ACTIVATION_MODES[value]
    raise ValueError(f"{field}={value!r} is not allowed; expected None (weight-only) or one of "
                     f"{tuple(ACTIVATION_MODES)}")
