"""Quantization-aware training: fake-quantized layers (STE, optional LSQ scales), prepare and convert."""

from hfquant.qat.distill import DistillationTrainer, distillation_loss
from hfquant.qat.linear import FakeQuantLinear
from hfquant.qat.model import convert, fake_layers, prepare
from hfquant.qat.rounding import quantize_weight

__all__ = ["DistillationTrainer", "FakeQuantLinear", "distillation_loss", "convert", "fake_layers", "prepare", "quantize_weight"]
