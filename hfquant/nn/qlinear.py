"""A frozen linear layer holding a quantized weight in the stored layout of its scheme's format.

Stored tensors are exactly those the format declares (:meth:`WeightFormat.specs`; their names are
the checkpoint keys, so a saved model reloads by name): ``weight`` (int32 words of packed codes,
never ``nn.Linear``'s shape, so a checkpoint loaded without ``import hfquant`` fails with a size
mismatch instead of loading garbage), ``weight_<param>`` per group (e.g. ``weight_scale``,
``weight_zero``), the tensors the scheme's input mode adds (:meth:`ActivationMode.specs`, e.g. the
calibrated ``input_scale`` of ``int8-static``), and ``bias`` unchanged in the model's dtype. Casting the module (``.to(bfloat16)``)
moves the stored tensors but never changes their dtype: only the bias and the compute dtype follow.

Inference runs the reference path (dequantize in the activation dtype, then ``F.linear``; for a
scheme with an ``input`` mode: quantize the input, integer matmul, dequantize) unless
:meth:`QuantLinear.prepare_kernel` (or :func:`prepare_for_inference` for a whole model) has
repacked the weight for the kernels in :mod:`hfquant.nn.kernels` (a chain by token range, e.g. the int4
kernel for decode and ``dequant-mm-cpu`` for prefill; at most one repacked copy). The repacked tensors are
non-persistent buffers named ``kernel_*``: ``state_dict()`` and saved checkpoints hold only the
canonical tensors above, and moving or casting the module repacks them for the new device/dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from hfquant.formats import QuantizedWeight, WeightFormat
from hfquant.nn import kernels
from hfquant.schemes import LayerScheme


class QuantLinear(nn.Module):
    """``y = x @ dequantize(W).T + b`` for a quantized ``W`` laid out as its scheme's format stores it.

    ``transposed_source`` records that the layer replaced a GPT-2 style ``Conv1D`` whose
    full-precision weight is stored ``(in, out)``; it only matters when a full-precision
    weight is quantized into this module or when the module is turned back into a float one.
    """

    def __init__(self, in_features: int, out_features: int, scheme: LayerScheme, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 transposed_source: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.transposed_source = transposed_source
        self.specs = scheme.weight.specs(out_features, in_features)
        self.input_specs = scheme.input_specs()
        for name, spec in {**self.specs, **self.input_specs}.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(spec.shape, dtype=spec.dtype, device=device),
                                                       requires_grad=False))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.kernel_plans: tuple[kernels.Plan, ...] = ()  # by token range, see kernels.plans_for
        self._kernel_request: tuple[torch.dtype, bool, str] | None = None  # (activation dtype, widen, mode)

    @property
    def kernel_plan(self) -> kernels.Plan | None:
        """The plan of the shortest inputs (decode), or None when the layer runs the reference path only."""
        return self.kernel_plans[0] if self.kernel_plans else None

    @property
    def fmt(self) -> WeightFormat:
        return self.scheme.weight

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors of the weight, keyed like :meth:`QuantizedWeight.stored`."""
        return {name: getattr(self, name) for name in self.specs}

    def input_params(self) -> dict[str, torch.Tensor]:
        """The stored tensors of the input mode (``{}`` for weight-only and dynamic modes)."""
        return {name: getattr(self, name) for name in self.input_specs}

    def load_input_params(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the input mode's tensors in (e.g. a calibrated ``input_scale``)."""
        for name in self.input_specs:
            getattr(self, name).data.copy_(tensors[name])

    def load_quantized(self, quantized: QuantizedWeight) -> None:
        """Copy a quantized weight in (shapes and dtypes must match this layer's format)."""
        for name, tensor in quantized.stored().items():
            getattr(self, name).data.copy_(tensor)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in)`` float weight this layer computes with."""
        return self.fmt.decode(self.stored(), self.in_features, dtype)

    def prepare_kernel(self, dtype: torch.dtype, widen: bool = False, mode: str = "auto") -> str:
        """Repack for the kernels the dispatch table picks for this format, device and ``dtype``.

        Returns the kernels' names by token range joined by ``+`` (e.g. ``int4pack-cpu+dequant-mm-cpu``),
        or ``"reference"`` when none applies (meta/offloaded weights included). ``widen`` lets 2/3-bit
        codes use a 4-bit kernel (more memory than the codes); ``mode`` is one of
        :data:`kernels.KERNEL_MODES`.
        """
        self.release_kernel()
        self._kernel_request = (dtype, widen, mode)
        if self.weight.device.type == "meta":
            return "reference"
        if self.scheme.input is not None:
            problem = self.scheme.input.check_device(self.weight.device)
            if problem:
                raise ValueError(f"scheme {self.scheme.name}: {problem}")
        activations = None if self.scheme.input is None else self.scheme.input.name
        plans = kernels.plans_for(self.fmt, self.in_features, self.out_features, self.weight.device, dtype, widen,
                                  mode, activations=activations)
        if not plans:
            return "reference"
        for plan in plans:
            with torch.no_grad():
                tensors = plan.kernel.pack({**self.stored(), **self.input_params()}, self.fmt, plan.layout,
                                           plan.route.computes_in)
            for name, tensor in tensors.items():  # one plan at most repacks (plans_for)
                self.register_buffer(_KERNEL_PREFIX + name, tensor, persistent=False)
        self.kernel_plans = plans
        return self.kernel_names()

    def kernel_names(self) -> str:
        """The kernels this layer runs by token range, joined by ``+``; ``"reference"`` for none."""
        return "+".join(p.kernel.name for p in self.kernel_plans) or "reference"

    def release_kernel(self) -> None:
        """Drop the repacked tensors; the layer goes back to the reference path."""
        for name in [n for n in self._buffers if n.startswith(_KERNEL_PREFIX)]:
            del self._buffers[name]
        self.kernel_plans = ()
        self._kernel_request = None

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        return {name[len(_KERNEL_PREFIX):]: t for name, t in self._buffers.items() if name.startswith(_KERNEL_PREFIX)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # adapters or layers before this one train
            return _InputGradient.apply(x, self)
        return self._output(x)

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        for plan in self.kernel_plans:
            if plan.handles(x):
                tensors = self.stored() if plan.kernel.reads_stored else self.kernel_tensors()
                return plan.linear(x, tensors, self.bias)
        if self.scheme.input is not None:
            return kernels.activation_quantized_linear(x, self.stored(), self.fmt, self.scheme.input,
                                                       self.in_features, self.bias, self.input_params())
        return kernels.reference_linear(x, self.stored(), self.fmt, self.in_features, self.bias)

    def _apply(self, fn, recurse: bool = True):  # same signature as nn.Module._apply
        """``.to()``/``.cuda()``/``.half()``: stored tensors move but keep their dtype; kernels are repacked."""
        request = self._kernel_request
        self.release_kernel()
        module = apply_keeping_dtypes(self, fn, recurse, (*self.specs, *self.input_specs))
        if request is not None:
            dtype, widen, mode = request
            probe = fn(torch.empty(0, dtype=dtype, device=self.weight.device))  # what fn does to activations
            self.prepare_kernel(probe.dtype, widen, mode)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name}, bias={self.bias is not None}, "
                f"kernel={self.kernel_names()}")


_KERNEL_PREFIX = "kernel_"


def apply_keeping_dtypes(module: nn.Module, fn, recurse: bool, names: tuple[str, ...]) -> nn.Module:  # noqa: ANN001
    """``nn.Module._apply(fn)`` for ``module``, but its parameters ``names`` (stored quantized tensors)
    only move: a cast in ``fn`` leaves their dtype as it is."""
    order = list(module._parameters)
    stored = {name: module._parameters.pop(name) for name in names}
    result = nn.Module._apply(module, fn, recurse)
    for param in stored.values():
        moved = fn(param.data)
        if moved.dtype != param.dtype:  # a cast: stored tensors only move
            moved = param.data.to(device=moved.device)
        param.data = moved
    module._parameters = {name: stored[name] if name in stored else module._parameters[name] for name in order}
    return result


class _InputGradient(torch.autograd.Function):
    """The layer's output by its fastest path, with a gradient for the input only (the stored weight is
    frozen): ``dx = dy · W`` with ``W`` decoded again in backward rather than kept (as QLoRA does).
    For a scheme with an input mode, that is the straight-through gradient of the input rounding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:  # noqa: ANN001
        ctx.layer = layer
        return layer._output(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


def prepare_for_inference(model: nn.Module, dtype: torch.dtype | None = None, widen: bool = False,
                          kernels: str = "auto") -> dict[str, str]:
    """Repack every :class:`QuantLinear` of ``model`` for its kernels; returns ``{layer name: kernel names}``
    (:meth:`QuantLinear.kernel_names`).

    ``dtype`` is the activation dtype to prepare for; ``None`` takes the dtype of the model's first
    floating-point parameter outside the quantized layers (its embeddings, usually). ``kernels``:
    ``"auto"`` (fastest routes, float32 may compute in bfloat16), ``"exact"`` (only kernels that
    compute in ``dtype``) or ``"off"`` (reference path only).
    """
    dtype = dtype or _activation_dtype(model)
    return {name: module.prepare_kernel(dtype, widen, kernels)
            for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def _activation_dtype(model: nn.Module) -> torch.dtype:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                return param.dtype
    return torch.get_default_dtype()
