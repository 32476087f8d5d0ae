"""LoRA adapters (``peft``) on hfquant's packed layers: the quantized weight stays frozen, adapters train on top.

peft dispatches LoRA layers by module type and knows only its own list of quantized layers; the one
entry it offers to a library outside that list is a per-config mapping
(``LoraConfig._register_custom_module``, experimental in peft). :func:`register` adds
``QuantLinear -> LoraQuantLinear`` to a config; :func:`get_peft_model` and :func:`load_adapter` do
that for the two calls users make::

    model = AutoModelForCausalLM.from_pretrained("int4-checkpoint")       # packed, frozen
    model = hfquant.lora.get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    Trainer(model=model, ...).train(); model.save_pretrained("adapter")    # adapter weights only
    model = hfquant.lora.load_adapter(AutoModelForCausalLM.from_pretrained("int4-checkpoint"), "adapter")

``merge_and_unload()`` works: merging adds the adapter's ``B·A·scaling`` to the decoded weight and
rounds the sum back into the layer's own format (RTN), so the merged model is an ordinary hfquant
model that saves and reloads — but it computes the rounded sum, not the adapter's exact output, and
cannot be unmerged (the rounding is not invertible); a warning says so when it happens.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as _peft_get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from hfquant.nn.qlinear import QuantLinear


class LoraQuantLinear(nn.Module, LoraLayer):
    """``y = QuantLinear(x) + scaling · B(A(dropout(x)))``: vanilla LoRA on a frozen packed layer."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        variants = {"use_dora": config.use_dora, "use_qalora": getattr(config, "use_qalora", False),
                    "alora_invocation_tokens": getattr(config, "alora_invocation_tokens", None),
                    "velora_config": getattr(config, "velora_config", None),
                    "arrow_config": getattr(config, "arrow_config", None)}
        used = {k: v for k, v in variants.items() if v not in (None, False)}
        if used:
            raise ValueError(f"LoraConfig {used} is not allowed on hfquant layers; allowed: vanilla LoRA "
                             f"(leave {sorted(used)} at their defaults)")
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            update = lora_b(lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's ``(out, in)`` weight update ``B · A · scaling`` in float32."""
        return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters to the decoded weight and round the sum back into the layer's format."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base: QuantLinear = self.get_base_layer()
        for name in [n for n in adapter_names if n in self.lora_A]:
            warnings.warn(f"merging LoRA adapter {name!r} into the {base.fmt.name} layer rounds the merged weight "
                          f"back to {base.fmt.name}: the merged model differs from the adapter's output by that "
                          f"rounding and cannot be unmerged", stacklevel=2)
            merged = base.dequantized_weight(torch.float32) + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging LoRA adapter {name!r} gives non-finite weights; the adapter is broken")
            request = base._kernel_request
            base.load_quantized(base.fmt.quantize(merged))
            if request is not None:
                base.prepare_kernel(*request)
            if self.lora_bias[name]:
                base.bias.data += self.lora_B[name].bias.to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        raise RuntimeError("a LoRA adapter merged into an hfquant layer cannot be unmerged: the merge rounded "
                           "the weight into the layer's format; reload the quantized model and the adapter instead")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """``config`` with hfquant's LoRA layer registered for :class:`QuantLinear` (idempotent); returns it."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"config={type(config).__name__} is not allowed; expected a peft LoraConfig")
    config._register_custom_module({QuantLinear: LoraQuantLinear})
    return config


def get_peft_model(model: nn.Module, config: LoraConfig, **kwargs: Any) -> PeftModel:
    """``peft.get_peft_model`` for a model holding hfquant layers (adapters on them train, the rest is frozen)."""
    return _peft_get_peft_model(model, register(config), **kwargs)


def load_adapter(model: nn.Module, adapter: str, is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` of a saved adapter onto a model holding hfquant layers."""
    config = register(LoraConfig.from_pretrained(adapter))
    config.inference_mode = not is_trainable
    return PeftModel.from_pretrained(model, adapter, config=config, is_trainable=is_trainable, **kwargs)
