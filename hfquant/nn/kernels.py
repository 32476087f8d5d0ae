"""Matmul kernels for packed weights, and the table that picks one per (format, device, dtype, tokens).

A :class:`QuantLinear` always has the *reference* path: unpack the codes, dequantize in the
activation dtype, ``F.linear``. It is the oracle in tests and the fallback for every case no
kernel covers. A *kernel* is one of torch's own weight-only-quantized matmuls; it needs the
weight repacked into its own layout once (:meth:`Kernel.pack`), and that layout can depend on
the machine (torch's CPU int4 layout differs between AVX512, AVX2 and other builds), so kernel
tensors are never saved: they live in non-persistent buffers and are rebuilt at load. The
canonical packed tensors stay too (``state_dict()`` returns them bit-exactly), so a prepared layer
holds both: +4 bits per weight for the int4 kernels (also for widened 2/3-bit codes), +8 bits for
int8, plus the kernel's scales. Rebuilding the canonical tensors from the kernel layout on save
would avoid that, but torch's CPU int4 layout is build-specific, so no exact inverse is kept.

Kernels (each a :class:`Kernel` value; the op names are torch's):

* ``int4pack-cpu`` — ``aten._weight_int4pack_mm_for_cpu``; torch dequantizes
  ``(q - 8) * s + z_t`` per group of 32/64/128/256 input columns, with ``s``/``z_t`` in the
  activation dtype. Ours is ``(q - zero) * scale``, so ``z_t = (8 - zero) * scale`` (exact in
  float32). A group of ours is split into several of torch's when it is larger (per channel: one
  group of ``in_features``); a short last group is handled by zero-padding the input columns.
  Needs ``out_features % 16 == 0``.
* ``int4pack-cuda`` — ``aten._weight_int4pack_mm`` (tinygemm), same convention, bfloat16 only,
  weight given as ``uint8 (out, in / 2)`` with the first code of each pair in the high nibble.
* ``int8pack-cpu`` / ``int8pack-cuda`` — ``aten._weight_int8pack_mm``: signed int8 weight, one
  scale per output channel (per-channel formats only). Our code ``q`` becomes ``q - 128``; an
  asymmetric zero point is folded into a per-row correction::

      y = x @ ((q - z) * s).T = s * (x @ (q - 128).T) - sum_k(x_k) * ((z - 128) * s)

* ``fp8-scaled-mm-cuda`` — ``aten._scaled_mm`` (cuBLASLt float8 GEMM, compute capability 8.9+):
  ``fp8-e4m3`` weights with per-channel scales, used as they are stored (a view, no copy). The
  activations are rounded to e4m3 too, with one float32 scale per token chosen at run time
  (``max|x| / 448``), so this kernel is W8A8 and never ``"exact"``; its extra error, measured on
  the bundled model through torch's CPU ``_scaled_mm``, is in ``bench/results/fp8_route.md``.

* ``int8-int-mm-cpu`` — ``aten._int_mm`` (``int8 × int8 -> int32``) for layers whose scheme has
  ``input = int8-dynamic`` (W8A8; only those: :func:`plan_for` matches a kernel's ``activations``
  to the layer's input mode, so weight-only kernels never run a W8A8 layer nor this one a
  weight-only layer). The input is quantized per token (:mod:`hfquant.activations`), the weight
  is its centered symmetric codes ``q - 128``, and ``y = acc · x_scale · w_scale`` in float32,
  one vectorised expression. Its integer sums are exact, and the reference path
  (:func:`activation_quantized_linear`) computes the same sums exactly in float64 and dequantizes
  the same way, so kernel and reference agree bit for bit (tested). torch 2.13's CPU ``_int_mm``
  takes any shape (checked: M = 1, odd K and N), so no padding is needed.
* ``int8-static-int-mm-cpu`` — the same ``aten._int_mm`` for ``input = int8-static``: the input is
  rounded on the layer's calibrated per-tensor grid (``input_scale``, copied into the kernel
  tensors when packing), then the same integer matmul and dequantization; bit-identical to the
  reference path (tested).
* ``fp8-dynamic-scaled-mm-cuda`` — ``aten._scaled_mm`` for ``input = fp8-dynamic``: the input is
  rounded per token exactly as the reference path rounds it (:mod:`hfquant.activations`); the
  float accumulation differs from the reference's float64 sums, so it agrees closely, not bit for
  bit. Not yet run on a GPU (its maths is tested through torch's CPU ``_scaled_mm``).

* ``dequant-mm-cpu`` — no torch op of its own: the reference path run in the route's compute
  dtype. It decodes the stored tensors (any format, a block of output rows at a time) into
  bfloat16 and runs the dense bfloat16 matmul (AMX / AVX512-BF16 on this CPU: 3.5-5x faster than
  float32 at prefill shapes), so it repacks nothing and costs no memory. For float32 or float16
  activations it adds bfloat16 rounding of the weight (relative 2**-9, the same rounding as a
  bfloat16 model's reference path), of the activations and of the output; it is never ``"exact"``.
  It is the route for long inputs (prefill), where the int4/int8 kernels lose to decoding once.

Kernels take a layer by its format, not its bit width: any format whose decoding is affine in
the code (``w = (q - zero) · scale``; it defines ``affine(params)``: the integer formats, ternary,
binary) with codes of a width the kernel takes. Codes of fewer than 4 bits (int2/int3, ternary,
binary) fit the int4 kernels too (the same maths), but widening them to 4 bits costs memory, so it
is opt-in (``widen=True``). The fp8 kernel takes e4m3 codes (``codes="fp8-e4m3"``); the other
formats (fp8-e5m2, grouped fp8, nf4, fp4, fp16, bf16) run the reference path.

:data:`ROUTES` is the dispatch table: for a device type and activation dtype, which kernels to
use, in order, each for a range of token counts (rows of the flattened input) where it beats the
reference path and the routes after it. A layer keeps a chain of routes (:func:`plans_for`: e.g.
``int4pack-cpu`` up to 64 tokens, then ``dequant-mm-cpu``) and runs the first whose range takes
the input; inputs outside every range use the reference path. The ranges are measurements
(``bench/inference.py --micro`` on CPU, ``bench/gpu_check.py`` on CUDA; numbers at the table).

A route may run its kernel in another *compute dtype* than the activations: float32 inputs are
rounded to bfloat16 for the CPU kernels (which are slow in float32) and the output is cast back to
float32. That adds bfloat16 rounding (relative 2**-9) to activations and outputs, an error far
below the weight quantization error of any format here. :data:`KERNEL_MODES` chooses what may run:
``"auto"`` every route, ``"exact"`` only routes that compute in the activation dtype, ``"off"`` none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from hfquant.activations import (ACTIVATION_MODES, FP8_DYNAMIC, INPUT_SCALE, INT8_DYNAMIC, INT8_STATIC, ActivationMode,
                                 centered_int8_codes)
from hfquant.formats import WeightFormat
from hfquant.formats.affine import IntAffine
from hfquant.formats.fp8 import FP8

Tensors = dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------------------
# Reference path: the format decodes the weight in the activation dtype, then F.linear.
# ----------------------------------------------------------------------------------------------


REFERENCE_CHUNK = 1 << 22  # weights dequantized at a time by the eager reference path


def reference_linear(x: torch.Tensor, stored: Tensors, fmt: WeightFormat, in_features: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequantize(W).T + b`` with the weight dequantized in ``x``'s dtype.

    Eagerly on CPU, a large weight is dequantized a block of output rows at a time: each block's
    temporaries stay small enough for the allocator to reuse and for the cache to hold, instead of
    a fresh page-faulted full-size float copy per call (2-3x faster for a 5632x2048 float32 layer
    at 1 token on the machine of the ROUTES measurements). Under ``torch.compile`` the whole
    weight is one expression for the compiler to fuse.
    """
    bias = None if bias is None else bias.to(x.dtype)
    out_features = stored["weight"].shape[0]
    rows = max(16, REFERENCE_CHUNK // in_features)
    if torch.compiler.is_compiling() or x.device.type != "cpu" or out_features <= rows:
        return F.linear(x, fmt.decode(stored, in_features, x.dtype), bias)
    parts = [F.linear(x, fmt.decode({k: v[start:start + rows] for k, v in stored.items()}, in_features, x.dtype))
             for start in range(0, out_features, rows)]
    y = torch.cat(parts, dim=-1)
    return y if bias is None else y + bias


def dequantize_int_accumulator(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``acc · x_scale · w_scale`` in float32: sums ``(M, N)``, per-token ``(M, 1)`` or per-tensor ``(1, 1)``
    input scales, per-channel ``(1, N)`` weight scales.

    In place on one float32 copy of ``acc`` (same operations, same order, so the same bits as the
    out-of-place product, with one allocation instead of three).
    """
    return acc.to(torch.float32).mul_(x_scale).mul_(w_scale)


def activation_quantized_linear(x: torch.Tensor, stored: Tensors, fmt: WeightFormat, mode: ActivationMode,
                                in_features: int, bias: torch.Tensor | None,
                                input_params: Tensors | None = None) -> torch.Tensor:
    """Reference path of a W8A8 layer: quantize ``x`` with ``mode`` (per token, or on the stored
    ``input_params`` grid), multiply the codes with the mode's weight codes, dequantize with
    ``x_scale · w_scale``; the output in ``x``'s dtype.

    The sums are computed in float64: exact for int8 codes (``|sum| <= 128 · 127 · in_features <
    2**53``), so a kernel's int32 sums, dequantized by :func:`dequantize_int_accumulator`, give the
    same bits; for fp8 codes float64 sums are exact up to float64 rounding of very long sums.
    """
    x2d = x.reshape(-1, x.shape[-1])
    x_codes, x_scale = mode.quantize(x2d, input_params or {})
    w_codes, w_scale = mode.weight_operand(stored, fmt, in_features)
    acc = x_codes.double() @ w_codes.double().T
    y = dequantize_int_accumulator(acc, x_scale, w_scale).to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Shape facts a kernel needs besides its tensors (decided once, when packing)."""

    in_features: int
    padded_in: int  # input columns after zero-padding to whole kernel groups
    group: int = 0  # the kernel's group size (int4 kernels)
    correct_zero: bool = False  # int8 with stored zero points: subtract the zero-point correction
    fmt: WeightFormat | None = None  # the format to decode (kernels that read the stored tensors)


@dataclass(frozen=True)
class Kernel:
    """A weight-only-quantized matmul of torch's, with how to lay our packed weight out for it.

    It takes formats whose decoding is affine in the code (``w = (q - zero) · scale``: they define
    ``affine(params) -> (scale, zero)``) with codes of the widths in ``bits``.
    ``layout(fmt, in_features, out_features)`` says whether the kernel can take a layer
    (``None``: it cannot) and how; ``pack`` builds its tensors from the stored ones; ``matmul``
    computes ``x2d @ W.T`` for a 2-D contiguous ``x2d``. A kernel that ``reads_stored`` repacks
    nothing (``pack`` returns ``{}``): its ``matmul`` gets the layer's stored tensors.
    """

    name: str
    device_type: str
    bits: tuple[int, ...] | None  # code widths taken as they are (None: any)
    probe: WeightFormat  # a format it takes, for the one-off check that it runs here (kernel_works)
    layout: Callable[[WeightFormat, int, int], Layout | None]
    pack: Callable[[Tensors, WeightFormat, Layout, torch.dtype], Tensors]
    matmul: Callable[[torch.Tensor, Tensors, Layout], torch.Tensor]
    widen_bits: tuple[int, ...] = ()  # narrower code widths it can take by widening (more memory)
    ops: tuple[str, ...] = ()  # aten ops it needs; missing ones make it unavailable
    codes: str = "affine"  # what decoding it takes: "affine" (w = (q - zero) * scale) or "fp8-e4m3"
    quantizes_input: bool = False  # rounds the activations to a narrower type itself (never "exact")
    activations: str | None = None  # the scheme input mode it implements (None: weight-only layers only)
    reads_stored: bool = False  # matmul takes the stored tensors; nothing is repacked

    def takes(self, fmt: WeightFormat, widen: bool) -> bool:
        if not _CODE_KINDS[self.codes](fmt):
            return False
        return self.bits is None or fmt.code_bits in self.bits or (widen and fmt.code_bits in self.widen_bits)


_CODE_KINDS: dict[str, Callable[[WeightFormat], bool]] = {
    "any": lambda fmt: True,
    "affine": lambda fmt: hasattr(fmt, "affine"),
    "fp8-e4m3": lambda fmt: getattr(fmt, "torch_dtype", None) == torch.float8_e4m3fn,
}


_INT4_GROUPS = (256, 128, 64, 32)  # what torch's int4 kernels accept, largest first


def _int4_layout(multiple_of_out: int) -> Callable[[WeightFormat, int, int], Layout | None]:
    def layout(fmt: WeightFormat, in_features: int, out_features: int) -> Layout | None:
        if out_features % multiple_of_out:
            return None
        width = fmt.group_width(in_features)
        per_channel = fmt.num_groups(in_features) == 1
        # Each kernel group must sit inside one of ours; prefer one that needs no input padding.
        fits = [g for g in _INT4_GROUPS if per_channel or width % g == 0]
        if not fits:
            return None
        group = next((g for g in fits if in_features % g == 0), fits[0])
        return Layout(in_features=in_features, padded_in=math.ceil(in_features / group) * group, group=group)
    return layout


def _int4_codes_and_zeros(stored: Tensors, fmt: WeightFormat,
                          lay: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``int32 (out, padded_in)`` codes and their ``float32 (out, groups)`` zero points, as 4-bit codes.

    Also returns the float32 scales. Codes narrower than 4 bits are shifted up per group (``q + c``,
    ``zero + c``, same weights) so the zero point lands on (or next to) 8: torch's zero term
    ``(8 - zero) * s`` is then 0 (or tiny) and loses nothing to rounding in 16-bit dtypes. Padded
    columns are 0 (they meet zero-padded inputs).
    """
    scale, zero = fmt.affine(fmt.stored_params(stored))
    shift = torch.round(8 - zero).clamp(0, 16 - 2**fmt.code_bits).to(torch.int32)
    codes = fmt.unpack_codes(stored["weight"])[:, :lay.in_features].to(torch.int32)
    width = fmt.group_width(lay.in_features)
    codes = codes + shift.repeat_interleave(width, dim=1)[:, :lay.in_features]
    return F.pad(codes, (0, lay.padded_in - lay.in_features)), zero + shift, scale


def _int4_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat, lay: Layout,
                           dtype: torch.dtype) -> torch.Tensor:
    """torch's ``(padded_in / group, out, 2)`` table of ``(s, (8 - zero) * s)``, computed in float32."""
    ours = torch.arange(lay.padded_in // lay.group, device=scale.device) * lay.group // fmt.group_width(
        lay.in_features)
    ours = ours.clamp(max=scale.shape[1] - 1)  # groups made only of padding reuse the last one
    s, z = scale[:, ours], zero[:, ours]
    return torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)


def _pad_input(x2d: torch.Tensor, lay: Layout) -> torch.Tensor:
    if lay.padded_in != lay.in_features:
        x2d = F.pad(x2d, (0, lay.padded_in - lay.in_features))
    return x2d.contiguous()


def _pack_int4_cpu(stored: Tensors, fmt: WeightFormat, lay: Layout, dtype: torch.dtype) -> Tensors:
    codes, zero, scale = _int4_codes_and_zeros(stored, fmt, lay)
    return {"weight": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
            "scales_and_zeros": _int4_scales_and_zeros(scale, zero, fmt, lay, dtype)}


def _matmul_int4_cpu(x2d: torch.Tensor, tensors: Tensors, lay: Layout) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(_pad_input(x2d, lay), tensors["weight"], lay.group,
                                                      tensors["scales_and_zeros"])


def _cuda_inner_k_tiles(padded_in: int) -> int:
    return next(t for t in (8, 4, 2) if padded_in % (t * 16) == 0)


def _pack_int4_cuda(stored: Tensors, fmt: WeightFormat, lay: Layout, dtype: torch.dtype) -> Tensors:
    codes, zero, scale = _int4_codes_and_zeros(stored, fmt, lay)
    pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    return {"weight": torch.ops.aten._convert_weight_to_int4pack(pairs, _cuda_inner_k_tiles(lay.padded_in)),
            "scales_and_zeros": _int4_scales_and_zeros(scale, zero, fmt, lay, dtype)}


def _matmul_int4_cuda(x2d: torch.Tensor, tensors: Tensors, lay: Layout) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm(_pad_input(x2d, lay), tensors["weight"], lay.group,
                                              tensors["scales_and_zeros"])


_INT8_COLUMNS = 32  # torch 2.13's bfloat16 CPU int8 kernel reads out of bounds unless in_features % 16 == 0


def _int8_layout(fmt: WeightFormat, in_features: int, out_features: int) -> Layout | None:
    if fmt.num_groups(in_features) != 1:
        return None
    padded = math.ceil(in_features / _INT8_COLUMNS) * _INT8_COLUMNS
    return Layout(in_features=in_features, padded_in=padded, correct_zero="zero" in fmt.param_dtypes)


def _pack_int8(stored: Tensors, fmt: WeightFormat, lay: Layout, dtype: torch.dtype) -> Tensors:
    codes = fmt.unpack_codes(stored["weight"])[:, :lay.in_features]
    weight = (codes ^ 0x80).view(torch.int8)  # q - 128, two's complement
    scale, zero = (t[:, 0] for t in fmt.affine(fmt.stored_params(stored)))
    tensors = {"weight": F.pad(weight, (0, lay.padded_in - lay.in_features)).contiguous(), "scale": scale.to(dtype)}
    if lay.correct_zero:
        tensors["zero_correction"] = (zero - 128) * scale  # float32
    return tensors


def _matmul_int8(x2d: torch.Tensor, tensors: Tensors, lay: Layout) -> torch.Tensor:
    y = torch.ops.aten._weight_int8pack_mm(_pad_input(x2d, lay), tensors["weight"], tensors["scale"])
    if lay.correct_zero:
        row_sums = x2d.sum(dim=-1, keepdim=True, dtype=torch.float32)
        y = (y.float() - row_sums * tensors["zero_correction"]).to(y.dtype)
    return y


def _fp8_layout(fmt: WeightFormat, in_features: int, out_features: int) -> Layout | None:
    """Per-channel scales only (the kernel scales whole output rows); cuBLASLt wants multiples of 16."""
    if fmt.num_groups(in_features) != 1 or in_features % 16 or out_features % 16:
        return None
    return Layout(in_features=in_features, padded_in=in_features)


def _pack_fp8(stored: Tensors, fmt: WeightFormat, lay: Layout, dtype: torch.dtype) -> Tensors:
    return {"weight": stored["weight"].view(torch.float8_e4m3fn).contiguous(),
            "scale": fmt.stored_params(stored)["scale"].float().reshape(1, -1).contiguous()}


_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def _matmul_fp8(x2d: torch.Tensor, tensors: Tensors, lay: Layout) -> torch.Tensor:
    """``torch._scaled_mm`` with the activations rounded to float8 e4m3, one float32 scale per token
    (dynamic, like the weight's per channel): ``y = (sx · fp8(x / sx)) @ (sw · q).T``."""
    x = x2d.float()
    x_scale = (x.abs().amax(dim=1, keepdim=True) / _E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    x_fp8 = (x / x_scale).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    return torch._scaled_mm(x_fp8, tensors["weight"].t(), scale_a=x_scale, scale_b=tensors["scale"],
                            out_dtype=x2d.dtype)


def _int_mm_layout(fmt: WeightFormat, in_features: int, out_features: int) -> Layout | None:
    return Layout(in_features=in_features, padded_in=in_features) if INT8_DYNAMIC.takes(fmt) else None


def _pack_int_mm(stored: Tensors, fmt: WeightFormat, lay: Layout, dtype: torch.dtype) -> Tensors:
    return {"weight": centered_int8_codes(stored, fmt, lay.in_features).contiguous(),
            "scale": fmt.affine(fmt.stored_params(stored))[0].reshape(1, -1).contiguous()}


def _matmul_int_mm(x2d: torch.Tensor, tensors: Tensors, lay: Layout) -> torch.Tensor:
    """``torch._int_mm`` (int8 × int8 -> int32) on per-token int8 inputs, dequantized in one expression."""
    x_codes, x_scale = INT8_DYNAMIC.quantize(x2d)
    acc = torch._int_mm(x_codes, tensors["weight"].t())
    return dequantize_int_accumulator(acc, x_scale, tensors["scale"]).to(x2d.dtype)


def _pack_int_mm_static(stored: Tensors, fmt: WeightFormat, lay: Layout, dtype: torch.dtype) -> Tensors:
    return {**_pack_int_mm(stored, fmt, lay, dtype), INPUT_SCALE: stored[INPUT_SCALE].float().reshape(1, 1)}


def _matmul_int_mm_static(x2d: torch.Tensor, tensors: Tensors, lay: Layout) -> torch.Tensor:
    """``torch._int_mm`` on int8 inputs rounded on the calibrated per-tensor grid, dequantized in one expression."""
    x_codes, x_scale = INT8_STATIC.quantize(x2d, tensors)
    acc = torch._int_mm(x_codes, tensors["weight"].t())
    return dequantize_int_accumulator(acc, x_scale, tensors["scale"]).to(x2d.dtype)


def _matmul_fp8_dynamic(x2d: torch.Tensor, tensors: Tensors, lay: Layout) -> torch.Tensor:
    """``torch._scaled_mm`` on the per-token e4m3 inputs of ``fp8-dynamic`` (the reference path's rounding)."""
    x_codes, x_scale = FP8_DYNAMIC.quantize(x2d)
    return torch._scaled_mm(x_codes, tensors["weight"].t(), scale_a=x_scale, scale_b=tensors["scale"],
                            out_dtype=x2d.dtype)
def _decode_layout(fmt: WeightFormat, in_features: int, out_features: int) -> Layout:
    return Layout(in_features=in_features, padded_in=in_features, fmt=fmt)


def _matmul_decoded(x2d: torch.Tensor, stored: Tensors, lay: Layout) -> torch.Tensor:
    """The reference path run in ``x2d``'s dtype (the route's compute dtype): decode, dense matmul."""
    return reference_linear(x2d, stored, lay.fmt, lay.in_features, None)


def _pack_nothing(stored: Tensors, fmt: WeightFormat, lay: Layout, dtype: torch.dtype) -> Tensors:
    return {}


_INT4_PROBE = IntAffine(bits=4, group_size=32, sym=False)
_INT8_PROBE = IntAffine(bits=8, group_size=-1, sym=False)
INT4_CPU = Kernel("int4pack-cpu", "cpu", bits=(4,), probe=_INT4_PROBE, widen_bits=(1, 2, 3), layout=_int4_layout(16),
                  pack=_pack_int4_cpu, matmul=_matmul_int4_cpu,
                  ops=("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"))
INT4_CUDA = Kernel("int4pack-cuda", "cuda", bits=(4,), probe=_INT4_PROBE, widen_bits=(1, 2, 3), layout=_int4_layout(8),
                   pack=_pack_int4_cuda, matmul=_matmul_int4_cuda,
                   ops=("_convert_weight_to_int4pack", "_weight_int4pack_mm"))
INT8_CPU = Kernel("int8pack-cpu", "cpu", bits=(8,), probe=_INT8_PROBE, layout=_int8_layout, pack=_pack_int8, matmul=_matmul_int8,
                  ops=("_weight_int8pack_mm",))
INT8_CUDA = Kernel("int8pack-cuda", "cuda", bits=(8,), probe=_INT8_PROBE, layout=_int8_layout, pack=_pack_int8, matmul=_matmul_int8,
                   ops=("_weight_int8pack_mm",))
FP8_CUDA = Kernel("fp8-scaled-mm-cuda", "cuda", bits=(8,), probe=FP8(group_size=-1, variant="e4m3"), codes="fp8-e4m3",
                  quantizes_input=True, layout=_fp8_layout, pack=_pack_fp8, matmul=_matmul_fp8, ops=("_scaled_mm",))
INT_MM_CPU = Kernel("int8-int-mm-cpu", "cpu", bits=(8,), probe=IntAffine(bits=8, group_size=-1, sym=True),
                    activations=INT8_DYNAMIC.name, layout=_int_mm_layout, pack=_pack_int_mm, matmul=_matmul_int_mm,
                    ops=("_int_mm",))
INT_MM_STATIC_CPU = Kernel("int8-static-int-mm-cpu", "cpu", bits=(8,), probe=IntAffine(bits=8, group_size=-1, sym=True),
                           activations=INT8_STATIC.name, layout=_int_mm_layout, pack=_pack_int_mm_static,
                           matmul=_matmul_int_mm_static, ops=("_int_mm",))
FP8_DYNAMIC_CUDA = Kernel("fp8-dynamic-scaled-mm-cuda", "cuda", bits=(8,), probe=FP8(group_size=-1, variant="e4m3"),
                          codes="fp8-e4m3", quantizes_input=True, activations=FP8_DYNAMIC.name, layout=_fp8_layout,
                          pack=_pack_fp8, matmul=_matmul_fp8_dynamic, ops=("_scaled_mm",))
DEQUANT_MM_CPU = Kernel("dequant-mm-cpu", "cpu", bits=None, probe=_INT4_PROBE, codes="any", reads_stored=True,
                        layout=_decode_layout, pack=_pack_nothing, matmul=_matmul_decoded)
KERNELS = {k.name: k for k in (INT4_CPU, INT4_CUDA, INT8_CPU, INT8_CUDA, FP8_CUDA, INT_MM_CPU, INT_MM_STATIC_CPU,
                               FP8_DYNAMIC_CUDA, DEQUANT_MM_CPU)}


# ----------------------------------------------------------------------------------------------
# Dispatch table
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Use ``kernel`` for activations of ``dtype`` on ``device_type`` for ``min_tokens`` to ``max_tokens`` rows.

    The kernel computes in ``compute_dtype`` (``None``: in ``dtype``): inputs are cast to it and
    outputs back.
    """

    kernel: str
    device_type: str
    dtype: torch.dtype
    max_tokens: int | None = None  # None: any number of tokens
    compute_dtype: torch.dtype | None = None
    min_tokens: int = 1

    @property
    def computes_in(self) -> torch.dtype:
        return self.compute_dtype or self.dtype

    @property
    def exact(self) -> bool:
        """Whether the kernel computes in the activation dtype (no extra rounding)."""
        return self.computes_in == self.dtype and not KERNELS[self.kernel].quantizes_input


# CPU limits from `python bench/inference.py --micro` (bench/results/inference_micro.md: a 5632x2048
# plus a 2048x5632 layer, 2-core Xeon with AVX512/AMX, torch 2.13). Speedup over the reference path:
#   bfloat16  int4pack: 34x at 1 token, 11x at 8, 3.0x at 32, 1.6x at 64, 0.83x at 128, 0.30x at 512
#             int8pack: 23x at 1 token, 7.3x at 8, 1.8x at 32, 1.0-1.2x at 64, 0.6x at 128
#   float32   int8pack 1.8x and int4pack 1.2-1.5x at 1 token, both lose from 2 tokens on (scalar loops);
#             through bfloat16 (compute_dtype), measured on a busy machine (noisy): int4pack >2x the float32
#             reference up to 64 tokens, 1.1-1.4x at 128-256; int8pack 2.9-12x up to 32 tokens, ~1x at 64.
#             The limits are those of the bfloat16 routes (the float32 reference is slower than bfloat16's).
#             Smaller layers differ: on SmolLM2-135M's shapes (576x576, 1536x576, 576x1536; 1 thread, load ~14)
#             the float32 int4pack at 1 token ran at 0.69-0.84x the reference (int8pack 1.06-1.67x), so the
#             "exact" float32 int4 route below helps large layers only; routes by shape are not implemented.
#   float16   int8pack 1.2x at 1 token; int4pack loses already at 1 token (0.8x)
# Long inputs in float32/float16: dequant-mm-cpu via bfloat16 (decode in bfloat16, bfloat16 matmul on
# AMX/AVX512-BF16). `--micro --threads 1 --tokens 16 32 64 128 512` (bench/results/inference_micro_prefill.md,
# 1 thread, load average 9-11, so noisy), speedup over the reference path in the activation dtype:
#   float32   int8 1.05x at 16 tokens, 1.1x at 32, 1.4x at 64, 2.5x at 128, 3.0x at 512; int4 g128 1.15x,
#             1.3x, 1.0x, 1.6x, 2.75x; int3 g128 0.89x and 0.93x at 16 and 32 (bfloat16 element-wise
#             decoding costs more than float32's when decoding dominates), 1.4x at 64, 1.4x, 2.1x
#             -> from 64 tokens on (below: the int4/int8 kernels, or the float32 reference path)
#   float16   1.27-1.32x at 16 tokens, 1.35-1.8x at 32-128, 2.1-2.8x at 512 (int8, int4 g128, int3 g128)
#             -> from 16 tokens on (not measured below 16)
# bfloat16 activations need no such route: their reference path is the same computation.
# CUDA limits from `bench/gpu_check.py` on an H200 (torch 2.11, 4096x4096 / 11008x4096 / 4096x11008):
#   bfloat16  int4pack (tinygemm): 11-21x at 1 token, 8-13x at 8, 4-5x at 32, 1.35-1.4x at 128,
#             0.7-0.8x at 256 (and 1.0-1.7x faster than a dense bfloat16 matmul up to 8 tokens)
#   int8pack: 1.1-2.2x at 1-2 tokens, 0.8-1.2x at 4, 0.5-0.7x at 8, in every dtype
#   torch 2.11's CUDA int4 kernel takes bfloat16 only; float16/float32 use the reference path.
#   fp8-scaled-mm: not yet timed (no GPU was lent since it was written; bench/gpu_check.py times it). It
#   reads half the bytes of a bfloat16 weight and runs on float8 tensor cores, so it is routed for any
#   number of tokens; kernel_works() keeps GPUs without float8 GEMMs (before sm89) on the reference path.
ROUTES: tuple[Route, ...] = (
    Route("int4pack-cpu", "cpu", torch.bfloat16, max_tokens=64),
    Route("int8pack-cpu", "cpu", torch.bfloat16, max_tokens=32),
    Route("int4pack-cpu", "cpu", torch.float32, max_tokens=64, compute_dtype=torch.bfloat16),
    Route("int8pack-cpu", "cpu", torch.float32, max_tokens=32, compute_dtype=torch.bfloat16),
    Route("int8pack-cpu", "cpu", torch.float32, max_tokens=1),
    Route("int4pack-cpu", "cpu", torch.float32, max_tokens=1),
    Route("dequant-mm-cpu", "cpu", torch.float32, min_tokens=64, compute_dtype=torch.bfloat16),
    Route("int8pack-cpu", "cpu", torch.float16, max_tokens=1),
    Route("dequant-mm-cpu", "cpu", torch.float16, min_tokens=16, compute_dtype=torch.bfloat16),
    Route("int4pack-cuda", "cuda", torch.bfloat16, max_tokens=128),
    Route("int8pack-cuda", "cuda", torch.bfloat16, max_tokens=2),
    Route("int8pack-cuda", "cuda", torch.float16, max_tokens=2),
    Route("int8pack-cuda", "cuda", torch.float32, max_tokens=2),
    Route("fp8-scaled-mm-cuda", "cuda", torch.bfloat16),
    Route("int8-int-mm-cpu", "cpu", torch.float32),
    Route("int8-int-mm-cpu", "cpu", torch.bfloat16),
    Route("int8-int-mm-cpu", "cpu", torch.float16),
    Route("int8-static-int-mm-cpu", "cpu", torch.float32),
    Route("int8-static-int-mm-cpu", "cpu", torch.bfloat16),
    Route("int8-static-int-mm-cpu", "cpu", torch.float16),
    Route("fp8-dynamic-scaled-mm-cuda", "cuda", torch.bfloat16),
)


@dataclass(frozen=True)
class Plan:
    """What a prepared layer runs: a kernel, for which inputs, with which layout."""

    kernel: Kernel
    route: Route
    layout: Layout

    def handles(self, x: torch.Tensor) -> bool:
        if x.device.type != self.route.device_type or x.dtype != self.route.dtype:
            return False
        tokens = x.numel() // max(x.shape[-1], 1)
        limit = self.route.max_tokens
        return tokens >= self.route.min_tokens and (limit is None or tokens <= limit)

    def linear(self, x: torch.Tensor, tensors: Tensors, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.kernel.matmul(x.reshape(-1, x.shape[-1]).to(self.route.computes_in), tensors, self.layout)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


KERNEL_MODES = ("auto", "exact", "off")  # which routes may run; see the module docstring


def check_mode(mode: str) -> None:
    """``ValueError`` naming ``kernels`` unless ``mode`` is one of :data:`KERNEL_MODES`."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r} is not allowed; expected one of {KERNEL_MODES}")


def plans_for(fmt: WeightFormat, in_features: int, out_features: int, device: torch.device | str,
              dtype: torch.dtype, widen: bool = False, mode: str = "auto",
              routes: tuple[Route, ...] = ROUTES, activations: str | None = None) -> tuple[Plan, ...]:
    """The routes of the table, in order, that this layer runs: ``()`` = reference path only.

    A layer runs, for an input of ``m`` tokens, the first of its plans whose route takes ``m``
    tokens (``min_tokens <= m <= max_tokens``); other inputs take the reference path. A route is kept when its
    kernel takes the layer and works here, and it takes more tokens than the routes kept before
    it (otherwise it would never run). A layer holds at most one repacked copy of its weight, so
    after a repacking kernel only kernels that read the stored tensors are kept.
    ``activations`` is the layer's input mode: only kernels implementing that mode are taken
    (a weight-only kernel never runs a W8A8 layer, nor the other way round).
    """
    check_mode(mode)
    if mode == "off":
        return ()
    device_type = torch.device(device).type
    plans: list[Plan] = []
    covered = 0  # tokens taken by the plans so far (math.inf: any number)
    for route in routes:
        if route.device_type != device_type or route.dtype != dtype or (mode == "exact" and not route.exact):
            continue
        kernel = KERNELS[route.kernel]
        limit = math.inf if route.max_tokens is None else route.max_tokens
        repacked = any(not p.kernel.reads_stored for p in plans)
        if kernel.activations != activations or limit <= covered or (repacked and not kernel.reads_stored):
            continue
        lay = kernel.layout(fmt, in_features, out_features) if kernel.takes(fmt, widen) else None
        if lay is not None and kernel_works(kernel.name, str(torch.device(device)), route.computes_in):
            plans.append(Plan(kernel, route, lay))
            covered = limit
    return tuple(plans)


def plan_for(fmt: WeightFormat, in_features: int, out_features: int, device: torch.device | str,
             dtype: torch.dtype, widen: bool = False, mode: str = "auto",
             routes: tuple[Route, ...] = ROUTES, activations: str | None = None) -> Plan | None:
    """The first of :func:`plans_for` (the plan of the shortest inputs); None = reference path."""
    plans = plans_for(fmt, in_features, out_features, device, dtype, widen, mode, routes, activations)
    return plans[0] if plans else None


@cache
def kernel_works(name: str, device: str, dtype: torch.dtype) -> bool:
    """Whether ``name`` runs here and agrees with the reference path on a small layer (checked once).

    Guards against torch builds without the op, or whose op rejects this device or dtype.
    """
    kernel = KERNELS[name]
    if not all(hasattr(torch.ops.aten, op) for op in kernel.ops):
        return False
    fmt = kernel.probe
    out_features, in_features = 32, 64
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen) / 8 + torch.rand(out_features, 1, generator=gen) / 8
    x = torch.randn(3, in_features, generator=gen).to(device=device, dtype=dtype)
    mode = ACTIVATION_MODES.get(kernel.activations)
    calibrated = mode.tensors_for_range(float(x.abs().max())) if mode and mode.tensors_for_range else {}
    stored = {k: v.to(device) for k, v in {**fmt.quantize(weight).stored(), **calibrated}.items()}
    try:
        lay = kernel.layout(fmt, in_features, out_features)
        tensors = stored if kernel.reads_stored else kernel.pack(stored, fmt, lay, dtype)
        got = kernel.matmul(x, tensors, lay).float()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    want = x.float() @ fmt.decode(stored, in_features, torch.float32).T
    return bool(torch.allclose(got, want, rtol=0.05, atol=0.05 * float(want.abs().max())))

