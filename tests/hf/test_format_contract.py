"""The model-level contract every registered format meets; a new format joins by registering.

For each format of :func:`hfquant.formats.format_names` on each tiny architecture: quantize while
loading, save, reload in a fresh process with bit-identical logits, stored bytes equal to the
declared bits, and every kernel route equal to the reference path. Plus mixed-precision plans
(several formats in one checkpoint) and the errors of the new fields.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.formats import format_names, make_format
from hfquant.nn.qlinear import QuantLinear
from hfquant.stats import checkpoint_bytes, storage_stats
from tiny_models import BUILDERS

IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 120, 77, 1, 2, 31, 9]])
GROUP = {"group_size": 32}  # tiny layers are 64/96 wide: groups that do not all align


def _config(name: str) -> hfquant.HfQuantConfig:
    grouped = make_format(name).grouped
    return hfquant.HfQuantConfig(format=name, **(GROUP if grouped else {}), kernels="off")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


RELOAD_ALL = """
import sys, json, torch
import hfquant
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
folders = json.loads(sys.argv[1])
out = {}
for key, folder in folders.items():
    model = AutoModelForCausalLM.from_pretrained(folder)
    hfquant.prepare_for_inference(model, kernels="off")
    with torch.no_grad():
        out[key] = model(torch.tensor(%s)).logits.contiguous()
save_file(out, sys.argv[2])
""" % IDS.tolist()


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_every_format_saves_and_reloads_bit_exactly_in_a_fresh_process(arch: str, tiny_checkpoints: dict,
                                                                       tmp_path: Path) -> None:
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch]))
    folders, expected = {}, {}
    for name in format_names():
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=_config(name))
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        assert layers and all(m.fmt == model.config.quantization_config.weight_format for m in layers.values())
        expected[name] = _logits(model)
        assert torch.isfinite(expected[name]).all()
        assert not torch.equal(expected[name], base) or name in ("fp16", "bf16")  # something was rounded
        stats = storage_stats(model)
        declared = sum(m.fmt.stored_bits(m.out_features, m.in_features) for m in layers.values())
        assert stats.quantized_bytes * 8 == declared, name
        folders[name] = str(tmp_path / name)
        model.save_pretrained(folders[name])
    result = subprocess.run([sys.executable, "-c", RELOAD_ALL, json.dumps(folders), str(tmp_path / "l.safetensors")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = load_file(tmp_path / "l.safetensors")
    for name in format_names():
        assert torch.equal(reloaded[name], expected[name]), name


@pytest.mark.parametrize("name", format_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_route_equals_the_reference_path(name: str, dtype: torch.dtype, tiny_checkpoints: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_config(name),
                                                 dtype=dtype)
    reference = _logits(model)
    for widen in (False, True):
        chosen = hfquant.prepare_for_inference(model, widen=widen, kernels="auto")
        got = _logits(model)
        if set(chosen.values()) == {"reference"}:
            assert torch.equal(got, reference)
        else:  # bfloat16 compute inside the kernels: compare at bfloat16 resolution of the logits
            assert torch.allclose(got.float(), reference.float(), rtol=0.05, atol=0.05 * reference.abs().max().item())
    hfquant.prepare_for_inference(model, kernels="off")
    assert torch.equal(_logits(model), reference)


RULES = {"re:.*\\.mlp\\.down_proj": "int8", "re:model\\.layers\\.0\\.self_attn\\..*": {"format": "nf4", "group_size": 16},
         "re:model\\.layers\\.1\\.self_attn\\.[qk]_proj": "bf16", "model.layers.1.mlp.up_proj": None}


def test_mixed_plan_resolves_saves_and_reloads(tiny_checkpoints: dict, tmp_path: Path) -> None:
    config = hfquant.HfQuantConfig(format="int4", group_size=32, rules=RULES, kernels="off")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)
    plan = model.config.quantization_config.plan
    assert plan.layers["model.layers.0.mlp.down_proj"].name == "int8-gc-sym"  # first match wins over later rules
    assert plan.layers["model.layers.0.self_attn.q_proj"].name == "nf4-g16"
    assert plan.layers["model.layers.1.self_attn.k_proj"].name == "bf16"
    assert plan.layers["model.layers.1.self_attn.v_proj"].name == "int4-g32-asym"  # the default
    assert "model.layers.1.mlp.up_proj" not in plan.layers and "lm_head" not in plan.layers
    assert isinstance(model.get_submodule("model.layers.1.mlp.up_proj"), torch.nn.Linear)
    assert len(plan.counts()) >= 4
    logits = _logits(model)
    model.save_pretrained(tmp_path / "mixed")
    saved = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert saved["plan"] == plan.to_dict() and saved["rules"] == [list(rule) for rule in RULES.items()]  # in order
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed")
    assert list(again.config.quantization_config.rules.items()) == list(RULES.items())
    hfquant.prepare_for_inference(again, kernels="off")
    assert torch.equal(_logits(again), logits)
    assert again.config.quantization_config.plan == plan

    layers = {n: m for n, m in again.named_modules() if isinstance(m, QuantLinear)}
    declared_bits = sum(m.fmt.stored_bits(m.out_features, m.in_features) for m in layers.values())
    stats = storage_stats(again)
    assert stats.quantized_bytes * 8 == declared_bits
    assert abs(checkpoint_bytes(tmp_path / "mixed") - stats.total_bytes) < 16_384  # + the safetensors header


def test_plan_table_lists_every_layer(tiny_checkpoints: dict) -> None:
    config = hfquant.HfQuantConfig(format="int4", group_size=32, rules=RULES)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)
    table = model.config.quantization_config.plan.table()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert f"`{name}` | `{module.scheme.name}`" in table


def test_rule_matching_no_layer_is_an_error_naming_it(tiny_checkpoints: dict) -> None:
    config = hfquant.HfQuantConfig(rules={"mlp.down_prj": "int8"})
    with pytest.raises(ValueError, match="down_prj"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(format="int5"), "format"),
    (dict(format="nf4", sym=True), "sym"),
    (dict(format="bf16", group_size=32), "group_size"),
    (dict(format=3), "format"),
    (dict(format="int4", bits=4), "bits"),
    (dict(format="ternary", scale_rule="median"), "scale_rule"),
    (dict(rules="int8"), "rules"),
    (dict(rules={"re:((": "int8"}), "rules"),
    (dict(rules={"": "int8"}), "rules"),
    (dict(rules={"lm_head": "int9"}), "rules['lm_head']"),
    (dict(rules={"lm_head": {"format": "int4", "group_size": 0}}), "group_size"),
    (dict(rules={"lm_head": 4}), "rules['lm_head']"),
])
def test_bad_values_of_the_new_fields_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^.*{__import__('re').escape(field)}"):
        hfquant.HfQuantConfig(**kwargs)
