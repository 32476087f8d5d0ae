"""int8-static through transformers: calibrated while loading (rtn and gptq), saved, reloaded bit-exactly,
and a checkpoint whose input scales are missing or wrong refused naming the layer (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.activations import INT8_STATIC
from hfquant.nn.qlinear import QuantLinear
from tiny_models import BUILDERS

TOKENS = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 120, 77, 1, 2, 31, 9]])


def _static(**kwargs) -> hfquant.HfQuantConfig:
    return hfquant.HfQuantConfig(**{"format": "int8", "group_size": -1, "activations": "int8-static",
                                    "dataset": TOKENS, "num_samples": 4, "seqlen": 24, **kwargs})


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _static_layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.scheme.input == INT8_STATIC}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_rtn_static_calibrates_saves_and_reloads_bit_exactly(arch: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=_static())
    layers = _static_layers(model)
    assert layers and len(layers) == sum(isinstance(m, QuantLinear) for m in model.modules())
    assert {m.kernel_plan.kernel.name for m in layers.values()} == {"int8-static-int-mm-cpu"}
    assert all(float(m.input_scale) > 0 for m in layers.values())
    logits, reference = _logits(model), _logits(base)
    assert 0 < (logits - reference).norm() / reference.norm() < 0.1
    for layer in layers.values():  # the kernel agrees with the reference path through the whole model
        layer.release_kernel()
    assert torch.equal(_logits(model), logits)

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["activations"] == "int8-static" and saved["observer"] == "mse" and saved["method"] == "rtn"
    assert saved["calibration"]["num_samples"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # no calibration data needed
    again = _static_layers(reloaded)
    assert all(torch.equal(again[n].input_scale, m.input_scale) for n, m in layers.items())
    assert torch.equal(_logits(reloaded), logits)
    assert torch.equal(_logits(reloaded, IDS[:, :1]), _logits(model, IDS[:, :1]))  # batch 1, one token


def test_the_first_layer_scale_is_minmax_of_its_float_inputs(tiny_checkpoints: dict) -> None:
    """The first layer called sees the float model's inputs: its scale is their max|x| / 127 exactly."""
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    seen = []
    layer = base.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda _m, args, _o: seen.append(args[0].abs().max()))
    with torch.no_grad():
        for batch in TOKENS.split(8):
            base(batch)
    handle.remove()
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"],
                                                 quantization_config=_static(observer="minmax"))
    want = torch.tensor([float(max(seen)) / 127], dtype=torch.float32)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.input_scale.data, want)


def test_observers_give_different_scales_and_all_reload(tiny_checkpoints: dict, tmp_path: Path) -> None:
    scales = {}
    for observer, extra in (("minmax", {}), ("percentile", {"observer_percentile": 99.0}), ("mse", {})):
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"],
                                                     quantization_config=_static(observer=observer, **extra))
        scales[observer] = torch.cat([m.input_scale for m in _static_layers(model).values()])
        model.save_pretrained(tmp_path / observer)
        saved = json.loads((tmp_path / observer / "config.json").read_text())["quantization_config"]
        assert saved["observer"] == observer and saved["observer_percentile"] == extra.get("observer_percentile")
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / observer)), _logits(model))
    # the first layer sees the float model's inputs in every run (later ones: inputs shaped by earlier scales)
    assert scales["percentile"][0] < scales["minmax"][0] and scales["mse"][0] < scales["minmax"][0]
    assert not torch.equal(scales["mse"], scales["minmax"])


def test_gptq_with_static_activations_composes(tiny_checkpoints: dict, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_static(method="gptq"))
    assert _static_layers(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["method"] == "gptq"
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(model))


def test_rules_make_only_some_layers_static(tiny_checkpoints: dict, tmp_path: Path) -> None:
    cfg = hfquant.HfQuantConfig(format="int8", group_size=-1, dataset=TOKENS, num_samples=4, seqlen=24,
                                rules={"mlp": {"format": "int8", "group_size": -1, "activations": "int8-static"}},
                                observer="mse")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=cfg)
    modes = {n: m.scheme.input for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert all((mode == INT8_STATIC) == (".mlp." in n) for n, mode in modes.items())
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(model))


def test_a_static_layer_outside_the_blocks_is_refused(tiny_checkpoints: dict) -> None:
    cfg = _static(modules_to_not_convert=[])
    with pytest.raises(ValueError, match="layer lm_head is outside the decoder blocks.*int8-static"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=cfg)


@pytest.fixture(scope="module")
def saved_static(tiny_checkpoints: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("static")
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_static()).save_pretrained(folder)
    return folder


def _tamper(folder: Path, change) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(file)
    with open(file, "rb") as handle:  # keep the header metadata (the plan)
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    change(tensors)
    save_file(tensors, file, metadata=header["__metadata__"])


KEY = "model.layers.1.mlp.down_proj.input_scale"


@pytest.mark.parametrize(("change", "match"), [
    (lambda t: t.pop(KEY), r"layer model\.layers\.1\.mlp\.down_proj: tensor 'input_scale' is missing"),
    (lambda t: t.update({KEY: t[KEY].half()}), r"down_proj: tensor 'input_scale' is F16 \(1,\).*F32 \(1,\)"),
    (lambda t: t.update({KEY: t[KEY].repeat(2)}), r"down_proj: tensor 'input_scale' is F32 \(2,\)"),
    (lambda t: t.update({KEY: torch.zeros(1)}), r"layer model\.layers\.1\.mlp\.down_proj: input_scale has "
                                                 r"non-finite or non-positive values"),
    (lambda t: t.update({KEY: torch.tensor([float("inf")])}), "down_proj: input_scale has non-finite"),
])
def test_a_bad_input_scale_fails_at_load_naming_the_layer(saved_static: Path, tmp_path: Path, change, match: str) -> None:
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(saved_static, folder)
    _tamper(folder, change)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


def test_static_needs_calibration_data_and_the_config_round_trips() -> None:
    cfg = hfquant.HfQuantConfig(format="int8", group_size=-1, activations="int8-static", observer="percentile")
    assert cfg.calibrated and cfg.observer_percentile == 99.99
    assert hfquant.HfQuantConfig(**cfg.to_dict()).to_dict() == cfg.to_dict()
    assert "observer" not in hfquant.HfQuantConfig(format="int8").to_dict()
    with pytest.raises(ValueError, match="observer='mse' is not allowed without a calibrated input mode"):
        hfquant.HfQuantConfig(format="int8", activations="int8-dynamic", observer="mse")
    with pytest.raises(ValueError, match="observer_percentile=99.0 is not allowed with observer='mse'"):
        hfquant.HfQuantConfig(format="int8", activations="int8-static", observer_percentile=99.0)
    with pytest.raises(ValueError, match=r"observer='p99' is not allowed; expected one of"):
        hfquant.HfQuantConfig(format="int8", activations="int8-static", observer="p99")
    with pytest.raises(ValueError, match="activations='int8-static' is not allowed with weight format 'int4"):
        hfquant.HfQuantConfig(format="int4", activations="int8-static")


def test_fp8_dynamic_runs_the_reference_path_on_cpu(tiny_checkpoints: dict, tmp_path: Path) -> None:
    cfg = hfquant.HfQuantConfig(format="fp8", activations="fp8-dynamic")
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=cfg)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.kernel_plan is None for m in layers)  # no CPU fp8 kernel: the reference path
    logits, reference = _logits(model), _logits(base)
    weight_only = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"],
                                                       quantization_config=hfquant.HfQuantConfig(format="fp8"))
    assert not torch.equal(_logits(weight_only), logits)
    assert 0 < (logits - reference).norm() / reference.norm() < 0.1
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits)
