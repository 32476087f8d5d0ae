"""The only layer that talks to transformers: config, quantizer, module surgery, registration."""

from __future__ import annotations

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from hfquant.hf.config import QUANT_METHOD, HfQuantConfig
from hfquant.hf.quantizer import HfQuantQuantizer


def register() -> None:
    """Make ``quant_method="hfquant"`` known to transformers; safe to call more than once."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HfQuantConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(HfQuantConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HfQuantQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(HfQuantQuantizer)


__all__ = ["HfQuantConfig", "HfQuantQuantizer", "register"]
