"""On-the-fly quantization, save, and reload through transformers, for each tiny architecture."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import hfquant
from hfquant.nn.qlinear import QuantLinear
from tiny_models import BUILDERS, VOCAB

IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 120, 77, 1, 2, 31, 9]])
FORMATS = [dict(bits=8, group_size=-1), dict(bits=4, group_size=32), dict(bits=3, group_size=64, sym=True),
           dict(bits=2, group_size=16)]

RELOAD_SCRIPT = """
import sys, torch
{imports}
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(torch.tensor({ids})).logits
save_file({{"logits": logits.contiguous()}}, sys.argv[2])
"""


def _run_fresh(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
def test_quantize_save_reload_in_fresh_process(arch: str, fmt: dict, tiny_checkpoints: dict, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=hfquant.HfQuantConfig(**fmt))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers, "no layer was quantized"
    assert not any(isinstance(m, (torch.nn.Linear, Conv1D)) for n, m in model.named_modules() if n != "lm_head")

    logits = _logits(model)
    reference = _logits(base)
    rel = (logits - reference).norm() / reference.norm()
    assert 0 < rel < {8: 0.02, 4: 0.3, 3: 0.5, 2: 1.5}[fmt["bits"]]
    out = model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hfquant" and saved["format"] == f"int{fmt['bits']}"
    assert saved["group_size"] == fmt["group_size"] and saved["sym"] == fmt.get("sym", fmt["bits"] == 8)
    assert set(saved["plan"]["layers"]) == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert "lm_head" in saved["modules_to_not_convert"] or arch in ("qwen2", "gpt2")  # tied: skipped by tie
    result = _run_fresh(RELOAD_SCRIPT.format(imports="import hfquant", ids=IDS.tolist()),
                        str(tmp_path / "q"), str(tmp_path / "logits.safetensors"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], logits)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_stored_tensors_are_packed(arch: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch],
                                                 quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for name, layer in model.named_modules():
            if isinstance(layer, QuantLinear):
                weight = f.get_tensor(f"{name}.weight")
                assert weight.dtype == torch.int32
                assert weight.shape == (layer.out_features, layer.in_features * 4 // 32)
                assert f.get_tensor(f"{name}.weight_scale").dtype == torch.float16
                assert f.get_tensor(f"{name}.weight_zero").dtype == torch.uint8
    assert not any(k.startswith("lm_head") and k.endswith("weight_scale") for k in keys)


def test_tied_embeddings_stay_tied_and_float(tiny_checkpoints: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], quantization_config=hfquant.HfQuantConfig())
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantizing_a_tied_lm_head_is_refused(method: str, tiny_checkpoints: dict) -> None:
    # Its weight is the embeddings' (not in the checkpoint under lm_head): it would load unquantized garbage.
    config = hfquant.HfQuantConfig(bits=8, method=method, modules_to_not_convert=[])
    with pytest.raises(ValueError, match=r"the plan quantizes \['lm_head'\].*tied"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], quantization_config=config)


def test_modules_to_not_convert_overrides_defaults(tiny_checkpoints: dict) -> None:
    config = hfquant.HfQuantConfig(bits=8, modules_to_not_convert=["mlp.down_proj"])
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert isinstance(model.lm_head, QuantLinear)  # an explicit list replaces the default skips


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loading_without_import_fails_loudly(arch: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=hfquant.HfQuantConfig(bits=8))
    model.save_pretrained(tmp_path / "q")
    result = _run_fresh(RELOAD_SCRIPT.format(imports="", ids=IDS.tolist()), str(tmp_path / "q"),
                        str(tmp_path / "logits.safetensors"))
    assert result.returncode != 0
    assert "mismatch" in result.stderr.lower()


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_dequantize_gives_float_layers_with_same_outputs(arch: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    # kernels="off": dequantize() reproduces the reference path (the default fp32 kernels round through bf16).
    config = hfquant.HfQuantConfig(kernels="off")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=config)
    logits = _logits(model)
    model = model.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    expected_type = Conv1D if arch == "gpt2" else torch.nn.Linear
    assert type(model.get_submodule(_first_linear_name(arch))) is expected_type
    torch.testing.assert_close(_logits(model), logits, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)  # a plain float checkpoint now
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits, rtol=1e-4, atol=1e-4)


def _first_linear_name(arch: str) -> str:
    return {"llama": "model.layers.0.self_attn.q_proj", "qwen2": "model.layers.0.self_attn.q_proj",
            "opt": "model.decoder.layers.0.fc1", "gpt2": "transformer.h.0.attn.c_attn"}[arch]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_device_map_auto_quantize_and_reload(arch: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    config = hfquant.HfQuantConfig(bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=config, device_map="auto")
    logits = _logits(model)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    assert torch.equal(_logits(again), logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(dtype: torch.dtype, tiny_checkpoints: dict, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["opt"], dtype=dtype,
                                                 quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))
    layer = model.model.decoder.layers[0].fc1
    assert layer.bias.dtype == dtype and layer.weight_scale.dtype == torch.float16
    logits = _logits(model)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)), logits)


def test_vocab_constant_matches_models() -> None:
    assert VOCAB > int(IDS.max())
