"""A packed layer passes gradients to its input (for adapters and trainable layers before it), never to its weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hfquant.formats import make_format
from hfquant.nn.qlinear import QuantLinear
from hfquant.schemes import LayerScheme


@pytest.mark.parametrize("spec,kernels", [("int4", "auto"), ("int4", "off"), ("int3", "off"), ("nf4", "off"),
                                          ("int8", "auto")])
def test_input_gradient_is_the_gradient_through_the_decoded_weight(spec: str, kernels: str) -> None:
    torch.manual_seed(0)
    fmt = make_format(spec, group_size=32) if spec != "int8" else make_format(spec)
    layer = QuantLinear(96, 48, LayerScheme(fmt), bias=True)
    layer.load_quantized(fmt.quantize(torch.randn(48, 96)))
    layer.bias.data.normal_()
    layer.prepare_kernel(torch.float32, mode=kernels)
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the same forward path with and without autograd
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    reference_x = x.detach().clone().requires_grad_(True)
    (F.linear(reference_x, layer.dequantized_weight(), layer.bias) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-5, atol=1e-5)
    assert all(not t.requires_grad and t.grad is None for t in layer.stored().values())
