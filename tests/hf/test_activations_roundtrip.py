"""W8A8 dynamic through transformers: quantize while loading, save, reload bit-exactly (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.activations import INT8_DYNAMIC
from hfquant.nn.qlinear import QuantLinear
from tiny_models import BUILDERS

IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 120, 77, 1, 2, 31, 9]])


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_int8_dynamic_quantizes_saves_and_reloads_bit_exactly(arch: str, tiny_checkpoints: dict,
                                                              tmp_path: Path) -> None:
    cfg = hfquant.HfQuantConfig(format="int8", group_size=-1, activations="int8-dynamic")
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=cfg)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.scheme.input == INT8_DYNAMIC for m in layers)
    assert {m.kernel_plan.kernel.name for m in layers} == {"int8-int-mm-cpu"}

    logits, reference = _logits(model), _logits(base)
    rel = (logits - reference).norm() / reference.norm()
    assert 0 < rel < 0.05
    weight_only = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch],
                                                       quantization_config=hfquant.HfQuantConfig(format="int8"))
    assert not torch.equal(_logits(weight_only), logits)  # the inputs really are quantized

    for layer in layers:  # the kernel agrees with the reference path through the whole model
        layer.release_kernel()
    assert torch.equal(_logits(model), logits)

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["activations"] == "int8-dynamic"
    assert {s.get("input") for s in saved["plan"]["schemes"].values()} == {"int8-dynamic"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert all(m.scheme.input == INT8_DYNAMIC for m in reloaded.modules() if isinstance(m, QuantLinear))
    assert torch.equal(_logits(reloaded), logits)
    assert torch.equal(_logits(reloaded, IDS[:, :1]), _logits(model, IDS[:, :1]))  # batch 1, one token


def test_rules_set_activations_per_layer(tiny_checkpoints: dict, tmp_path: Path) -> None:
    cfg = hfquant.HfQuantConfig(format="int8", group_size=-1,
                                rules={"mlp": {"format": "int8", "group_size": -1, "activations": "int8-dynamic"}})
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=cfg)
    modes = {n: m.scheme.input for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert all((mode == INT8_DYNAMIC) == (".mlp." in n) for n, mode in modes.items())
    assert INT8_DYNAMIC in modes.values() and None in modes.values()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded), _logits(model))
