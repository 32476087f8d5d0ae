"""``HfQuantQuantizer``: the ``from_pretrained`` lifecycle for ``quant_method="hfquant"``.

Thin by design: module surgery is in :mod:`hfquant.hf.integration`, the maths in
:mod:`hfquant.quantize` and :mod:`hfquant.algorithms`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from hfquant.hf import integration
from hfquant.hf.calibrate import calibrate_and_quantize
from hfquant.hf.config import HfQuantConfig
from hfquant.hf.saving import save_pretrained_with_card
from hfquant.nn.qlinear import QuantLinear, prepare_for_inference


class HfQuantQuantizer(HfQuantizer):
    """Quantizes while loading (RTN), after loading (calibrated methods), or loads a packed checkpoint."""

    requires_calibration = False
    quantization_config: HfQuantConfig

    def _process_model_before_weight_loading(self, model: Any, keep_in_fp32_modules: list[str] | None = None,
                                             **kwargs: Any) -> None:
        config = self.quantization_config
        skip = self.get_modules_to_not_convert(model, config.modules_to_not_convert, keep_in_fp32_modules)
        config.modules_to_not_convert = sorted(skip)
        if not self.pre_quantized:
            integration.check_no_tied_layers(model, config.modules_to_not_convert)
        if self.pre_quantized or not config.calibrated:
            integration.replace_linear_layers(model, config.weight_format, config.modules_to_not_convert)

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QuantLinear) and tensor_name == "weight"

    def get_quantize_ops(self) -> integration.QuantizeWeight:
        return integration.QuantizeWeight(self.quantization_config.weight_format)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self.quantization_config.calibrated and not self.pre_quantized:
            calibrate_and_quantize(model, self.quantization_config)
        if not self.pre_quantized:
            self.quantization_config.base_model = model.name_or_path
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.requires_grad_(False)
        model.save_pretrained = partial(save_pretrained_with_card, model, model.save_pretrained)
        # repack for the kernels of hfquant.nn.kernels; state_dict unchanged
        prepare_for_inference(model, kernels=self.quantization_config.kernels)
        return model

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        return integration.dequantize_model(model, dtype or torch.float32)

    @property
    def is_compileable(self) -> bool:
        """QuantLinear compiles without graph breaks (reference path and kernels), so generate() may compile."""
        return True

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
