"""``FakeQuantLinear``: a float linear layer that computes with its weight rounded to a format.

Forward: ``x @ Wq.T + b`` where ``Wq`` is :func:`~hfquant.qat.rounding.quantize_weight` of the float
weight, decoded, and the product is :func:`hfquant.nn.kernels.reference_linear` itself, so the value
is bit for bit what the converted ``QuantLinear`` computes on the reference path.

Backward: straight through (STE): the gradient of ``Wq`` goes to the float weight unchanged. With
``learn_scales`` the per-group ``scale`` is a parameter (LSQ): the forward rounds on it as stored
(its dtype's rounding), and its gradient is LSQ's ``d(s·q)/ds = q − w/s`` for weights inside the
grid, ``q`` for clipped ones (more than one scale unit from their grid point).
"""

from __future__ import annotations

import torch
from torch import nn

from hfquant.formats import QuantizedWeight
from hfquant.nn.kernels import reference_linear
from hfquant.qat.rounding import quantize_weight
from hfquant.schemes import LayerScheme


class _ExactLinear(torch.autograd.Function):
    """Value: the reference path on stored tensors; gradients: those of ``F.linear(x, Wq, bias)``, with
    the weight's gradient handed to ``w_grad`` (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, w_grad, bias, quantized: QuantizedWeight):  # noqa: ANN001, ANN205
        stored = quantized.stored()
        ctx.save_for_backward(x, quantized.fmt.decode(stored, w_grad.shape[1], x.dtype))
        ctx.has_bias = bias is not None
        return reference_linear(x, stored, quantized.fmt, w_grad.shape[1], bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, w_quantized = ctx.saved_tensors
        grad_x = grad @ w_quantized.to(grad.dtype)
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class FakeQuantLinear(nn.Module):
    """A trainable linear layer whose forward rounds its weight through ``scheme``'s format.

    ``weight`` keeps the layout of the layer it replaced (``(in, out)`` for GPT-2's ``Conv1D``,
    ``transposed_source=True``), so a float checkpoint saved during training has the original keys.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: LayerScheme,
                 transposed_source: bool = False, learn_scales: bool = False) -> None:
        super().__init__()
        self.scheme = scheme
        self.transposed_source = transposed_source
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.out_features, self.in_features = self.float_weight().shape
        self.learn_scales = learn_scales
        if learn_scales:  # allocated from the format's specs (meta while loading); see init_scales
            for name, spec in scheme.weight.specs(self.out_features, self.in_features).items():
                if name == "weight_scale":
                    self.weight_scale = nn.Parameter(torch.zeros(spec.shape, dtype=torch.float32, device=weight.device))
                elif name != "weight":
                    self.register_buffer(name, torch.zeros(spec.shape, dtype=spec.dtype, device=weight.device))

    def init_scales(self) -> None:
        """Learned parameters start on the format's own per-group grid of the current weight."""
        with torch.no_grad():
            for name, value in self.fmt.quantize(self.float_weight()).params.items():
                getattr(self, f"weight_{name}").copy_(value)

    @property
    def fmt(self):  # noqa: ANN201  (WeightFormat)
        return self.scheme.weight

    def float_weight(self) -> torch.Tensor:
        """The ``(out, in)`` float weight."""
        return self.weight.t() if self.transposed_source else self.weight

    def learned_params(self) -> dict[str, torch.Tensor] | None:
        if not self.learn_scales:
            return None
        return {name: getattr(self, f"weight_{name}") for name in self.fmt.param_dtypes}

    def quantized(self) -> QuantizedWeight:
        """The weight as the converted layer stores it (the shared rounding function)."""
        return quantize_weight(self.float_weight(), self.fmt, self.learned_params())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized = self.quantized()
        w = self.float_weight()
        w_grad = self._ste_weight(w, quantized) if self.learn_scales else w
        return _ExactLinear.apply(x, w_grad, self.bias, quantized)

    def _ste_weight(self, w: torch.Tensor, quantized: QuantizedWeight) -> torch.Tensor:
        """A surrogate with d/dw = 1 and LSQ's d/dscale; its value is zero plus ``w`` and never used forward."""
        width = self.fmt.group_width(self.in_features)
        per_column = lambda t: t.repeat_interleave(width, dim=1)[:, :self.in_features]  # noqa: E731
        scale, stored = per_column(self.weight_scale), per_column(quantized.params["scale"].float())
        unit = quantized.dequantize(torch.float32) / stored  # decoded value at scale 1
        inside = ((w.detach() - unit * stored).abs() <= stored).float()
        lsq = scale * (unit - inside * w.detach() / stored)
        return w + (lsq - lsq.detach())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
                f"bias={self.bias is not None}, learn_scales={self.learn_scales}")
