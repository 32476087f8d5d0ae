"""Silently wrong models at load: every corrupted or inconsistent checkpoint fails, naming the layer.

Each case writes a real quantized tiny checkpoint, damages it the way a user, a tool or a disk could
(drop a tensor, widen a dtype, hand-edit config.json, write out-of-range values), and loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.nn.qlinear import QuantLinear

LAYER = "model.layers.0.mlp.up_proj"
IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8]])
FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture()
def saved(tiny_checkpoints: dict, tmp_path: Path) -> Path:
    """A tiny Llama, int4 g32 asymmetric (scales and zero points), saved."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"],
                                                 quantization_config=hfquant.HfQuantConfig(format="int4", group_size=32))
    model.save_pretrained(tmp_path / "q")
    return tmp_path / "q"


def _rewrite_weights(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def _edit_config(folder: Path, change) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    change(data["quantization_config"])
    path.write_text(json.dumps(data))


def _load_fails(folder: Path, *needles: str) -> None:
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("tensor", ["weight", "weight_scale", "weight_zero"])
def test_missing_tensor_fails_naming_layer_and_tensor(saved: Path, tensor: str) -> None:
    _rewrite_weights(saved, lambda t: t.pop(f"{LAYER}.{tensor}"))
    _load_fails(saved, LAYER, repr(tensor), "missing")


def test_codes_stored_with_another_dtype_fail(saved: Path) -> None:
    _rewrite_weights(saved, lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"].to(torch.int64)}))
    _load_fails(saved, LAYER, "'weight' is I64")


def test_scales_stored_with_another_dtype_fail(saved: Path) -> None:
    key = f"{LAYER}.weight_scale"
    _rewrite_weights(saved, lambda t: t.update({key: t[key].to(torch.bfloat16)}))
    _load_fails(saved, LAYER, "'weight_scale' is BF16")


def test_config_with_another_group_size_of_the_same_group_count_fails(saved: Path) -> None:
    """in_features 64 at group 32 and at group 33 both have 2 groups: the shapes alone cannot tell."""
    def change(config: dict) -> None:
        plan = config["plan"]
        plan["schemes"] = {"int4-g33-asym": {"weight": {"format": "int4", "group_size": 33, "sym": False}}}
        plan["layers"] = {name: "int4-g33-asym" for name in plan["layers"]}
        config["group_size"] = 33
    _edit_config(saved, change)
    _load_fails(saved, "plan differs")


def test_config_with_flipped_symmetry_fails(saved: Path) -> None:
    def change(config: dict) -> None:
        plan = config["plan"]
        plan["schemes"] = {"int4-g32-sym": {"weight": {"format": "int4", "group_size": 32, "sym": True}}}
        plan["layers"] = {name: "int4-g32-sym" for name in plan["layers"]}
    _edit_config(saved, change)
    _load_fails(saved, "plan differs")


def test_inconsistent_plan_in_config_fails(saved: Path) -> None:
    _edit_config(saved, lambda c: c["plan"]["schemes"]["int4-g32-asym"]["weight"].update(group_size=16))
    with pytest.raises(ValueError, match="inconsistent"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_layer_dropped_from_the_plan_fails(saved: Path) -> None:
    _edit_config(saved, lambda c: c["plan"]["layers"].pop(LAYER))
    _load_fails(saved, "plan differs")


def test_weights_saved_without_the_plan_header_fail(saved: Path) -> None:
    path = saved / "model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt"})
    _load_fails(saved, "no hfquant plan")


def test_zero_point_above_the_largest_code_fails(saved: Path) -> None:
    key = f"{LAYER}.weight_zero"
    _rewrite_weights(saved, lambda t: t[key].__setitem__((0, 0), 200))
    _load_fails(saved, LAYER, "weight_zero", "largest code 15")


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0])
def test_non_finite_or_non_positive_scale_fails(saved: Path, value: float) -> None:
    key = f"{LAYER}.weight_scale"
    _rewrite_weights(saved, lambda t: t[key].__setitem__((3, 1), value))
    _load_fails(saved, LAYER, "weight_scale")


def test_intact_checkpoint_still_loads(saved: Path) -> None:
    _rewrite_weights(saved, lambda t: None)  # rewritten, same content
    assert isinstance(AutoModelForCausalLM.from_pretrained(saved).get_submodule(LAYER), QuantLinear)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_non_finite_float_weights_are_an_error_naming_the_layer(method: str, tiny_checkpoints: dict,
                                                                tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    with torch.no_grad():
        model.get_submodule(LAYER).weight[3, 7] = float("inf")
    model.save_pretrained(tmp_path / "inf")
    extra = dict(dataset=torch.randint(0, 100, (2, 16)), num_samples=2, seqlen=16) if method == "gptq" else {}
    with pytest.raises(ValueError, match=f"{LAYER}.*non-finite"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "inf", quantization_config=hfquant.HfQuantConfig(
            format="int4", group_size=32, method=method, **extra))


def test_casting_keeps_stored_dtypes_and_saves_the_documented_format(saved: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(saved)
    layer = model.get_submodule(LAYER)
    before = {k: v.detach().clone() for k, v in layer.stored().items()}
    model.to(torch.bfloat16)
    assert {k: v.dtype for k, v in layer.stored().items()} == {k: v.dtype for k, v in before.items()}
    assert all(torch.equal(layer.stored()[k], v) for k, v in before.items())
    assert layer.bias is None or layer.bias.dtype == torch.bfloat16
    logits = model(IDS).logits
    assert logits.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "cast")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "cast", dtype=torch.bfloat16)
    assert all(torch.equal(again.get_submodule(LAYER).stored()[k], v) for k, v in before.items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_version_1_checkpoints_reload_bit_exactly(arch: str) -> None:
    """Saved by hfquant 0.1 (format_version 1, committed fixtures) before the formats redesign."""
    folder = FIXTURES / f"v1_{arch}"
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format_version"] == 1
    model = AutoModelForCausalLM.from_pretrained(folder)
    weights = load_file(folder / "expected_weights.safetensors")
    for name, expected_weight in weights.items():
        layer = model.get_submodule(name.removesuffix(".weight"))
        assert torch.equal(layer.dequantized_weight(torch.float32), expected_weight), name
    hfquant.prepare_for_inference(model, kernels="off")
    expected = load_file(folder / "expected_logits.safetensors")
    with torch.no_grad():  # matmuls differ in the last bits between CPUs; the weights above are exact
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=0, atol=1e-5)


def test_version_1_checkpoint_resaves_as_version_2(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "v1_llama")
    model.save_pretrained(tmp_path / "v2")
    saved = json.loads((tmp_path / "v2" / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == 2 and saved["plan"]["schemes"] == {
        "int4-g16-asym": {"weight": {"format": "int4", "group_size": 16, "sym": False}}}
    for key, tensor in load_file(FIXTURES / "v1_llama" / "model.safetensors").items():
        assert torch.equal(load_file(tmp_path / "v2" / "model.safetensors")[key], tensor), key
