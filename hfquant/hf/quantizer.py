"""``HfQuantQuantizer``: the ``from_pretrained`` lifecycle for ``quant_method="hfquant"``.

Thin by design: module surgery is in :mod:`hfquant.hf.integration`, the maths in
:mod:`hfquant.formats` and :mod:`hfquant.algorithms`.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from hfquant.algorithms import get_method
from hfquant.hf import integration, verify
from hfquant.hf.calibrate import block_transforms, calibrate_and_quantize
from hfquant.hf.config import HfQuantConfig
from hfquant.hf.saving import save_pretrained_with_card
from hfquant.nn.qembedding import QuantEmbedding
from hfquant.nn.qlinear import QuantLinear, prepare_for_inference
from hfquant.plan import unmatched

logger = logging.getLogger(__name__)


class HfQuantQuantizer(HfQuantizer):
    """Quantizes while loading (data-free methods), after loading (calibrated methods), or loads a saved checkpoint."""

    requires_calibration = False
    quantization_config: HfQuantConfig

    def __init__(self, quantization_config: HfQuantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._conversions = integration.ConversionLog()

    def _process_model_before_weight_loading(self, model: Any, keep_in_fp32_modules: list[str] | None = None,
                                             checkpoint_files: list[str] | None = None, **kwargs: Any) -> None:
        verify.require_safetensors(checkpoint_files or [])
        config = self.quantization_config
        requested = config.modules_to_not_convert
        skip = self.get_modules_to_not_convert(model, requested, keep_in_fp32_modules)
        embeddings = integration.embedding_layers(model, with_head=config.embeddings is not None)
        if requested is None and config.embeddings is not None:  # the embeddings scheme decides them, not the default skips
            skip = [name for name in skip if name not in embeddings or name in (keep_in_fp32_modules or [])]
        skip = sorted(skip)
        config.modules_to_not_convert = skip
        layers = integration.quantizable_layers(model)
        saved_plan = config.plan if self.pre_quantized else None
        if saved_plan is None:
            if not self.pre_quantized:
                _warn_unmatched(requested, [name for name, _ in model.named_modules()])
            config.plan = config.quant_plan.resolve(layers, skip, embeddings)
        unknown = sorted(set(config.plan.layers) - set(layers))
        if unknown:
            raise ValueError(f"the quantization plan names {unknown[:5]}, which are not linear layers (or the token "
                             f"embedding) of {type(model).__name__}; the checkpoint was saved from another architecture")
        if not (config.qat or self.pre_quantized):
            integration.check_no_tied_layers(model, config.plan, allow_tied_heads=True)
        integration.check_embedding_plan(model, config.plan, config.embeddings)
        if config.qat:  # float weights load by name into fake-quantized layers (a QAT checkpoint resumes)
            integration.check_no_tied_layers(model, config.plan)
            if integration.input_embedding_name(model) in config.plan.layers:
                raise ValueError("qat=True is not allowed with rules that quantize the token embedding "
                                 f"{integration.input_embedding_name(model)}; allowed: keep it in full precision")
            _qat_model().replace_with_fake(model, config.plan, config.qat_learn_scales)
            return
        if self.pre_quantized:
            if checkpoint_files:
                shapes = {name: integration.linear_shape(m) for name, m in layers.items()}
                verify.verify_checkpoint(checkpoint_files, shapes, config.plan, require_metadata=saved_plan is not None,
                                         tied=integration.tied_heads(model))
        else:
            block_transforms(model, config)  # an architecture without layer mappings fails before the weights load
        if self.pre_quantized or not config.calibrated:
            integration.replace_linear_layers(model, config.plan)

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized or self.quantization_config.qat:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, (QuantLinear, QuantEmbedding)) and tensor_name == "weight"

    def get_quantize_ops(self) -> integration.QuantizeWeight:
        config = self.quantization_config
        return integration.QuantizeWeight(get_method(config.method), config.options, self._conversions)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        config = self.quantization_config
        if config.qat:
            return _qat_model().finish_loading(model, resumed=self.pre_quantized)
        if self.pre_quantized:
            verify.check_loaded_values(model)
        else:
            if config.calibrated:
                calibrate_and_quantize(model, config)
                integration.tie_quantized_heads(model)
            else:  # a tied head's weight is its embedding's, quantized under the embedding's name
                tied = integration.tied_heads(model)
                self._conversions.check([name for name in config.plan.layers if name not in tied])
            config.base_model = model.name_or_path
        integration.check_heads_tied(model)
        for module in model.modules():
            if isinstance(module, (QuantLinear, QuantEmbedding)):
                module.requires_grad_(False)
        model.save_pretrained = partial(save_pretrained_with_card, model, model.save_pretrained)
        # repack for the kernels of hfquant.nn.kernels; state_dict unchanged
        prepare_for_inference(model, kernels=config.kernels)
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """Save the ordinary state dict, with the resolved plan in each safetensors header (see :mod:`verify`).

        A quantized tied head's tensors are its embedding's: they are saved once, under the embedding's name.
        """
        metadata = verify.plan_metadata(self.quantization_config.plan)
        head_keys = integration.tied_head_keys(model)
        if not head_keys:
            return None, metadata
        return {k: v for k, v in model.state_dict().items() if k not in set(head_keys)}, metadata

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
        """Always: a fake-quantized model (``qat=True``) trains whole; a packed one trains adapters on its
        frozen layers (``hfquant.lora``), and transformers refuses to train it without adapters."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """The Trainer fine-tunes the whole fake-quantized model (no adapters needed) when ``qat=True``."""
        return self.quantization_config.qat


def _qat_model():  # noqa: ANN202  (hfquant.qat imports hfquant.hf: imported when first used)
    from hfquant.qat import model

    return model


def _warn_unmatched(patterns: list[str] | None, module_names: list[str]) -> None:
    missing = unmatched(patterns or [], module_names)
    if missing:
        logger.warning("hfquant: modules_to_not_convert pattern(s) %s match no module of this model; "
                       "check them for typos", missing)
