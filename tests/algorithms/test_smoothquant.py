"""SmoothQuant: the scales, the float model unchanged by smoothing, composition with RTN/GPTQ, exact reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.algorithms.smoothquant import SmoothQuant, smoothing_scales
from hfquant.calibration.pipeline import capture_block_inputs, find_blocks, run_with_input_hooks
from hfquant.nn.qlinear import QuantLinear
from tiny_models import build

TOKENS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
EVAL = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
W8A8 = dict(format="int8", group_size=-1, activations="int8-dynamic")


def test_scales_follow_the_formula() -> None:
    act, weight = torch.tensor([4.0, 1.0, 0.0, 9.0]), torch.tensor([1.0, 4.0, 2.0, 0.0])
    torch.testing.assert_close(smoothing_scales(act, weight, 0.5), torch.tensor([2.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(smoothing_scales(act, weight, 1.0), torch.tensor([4.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(smoothing_scales(act, weight, 0.0), torch.tensor([1.0, 0.25, 1.0, 1.0]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_smoothing_leaves_the_float_model_unchanged_and_flattens_activations(arch: str) -> None:
    model = build(arch)
    with torch.no_grad():  # plant an outlier channel, as real LLMs have, so smoothing has work to do
        for block in find_blocks(model):
            for norm in [m for m in block.modules() if getattr(m, "weight", None) is not None and m.weight.dim() == 1]:
                norm.weight[3] *= 30
        reference = model(EVAL).logits
    transform = SmoothQuant(0.5, model.config)
    block = find_blocks(model)[0]
    inputs = capture_block_inputs(model, block, list(TOKENS.split(4)))
    watched = transform.watch(block, "")
    run_with_input_hooks(block, watched, inputs, transform.observe)
    before = {name: act.clone() for name, act in transform.act_max.items()}
    transform.apply(block, "")
    with torch.no_grad():
        torch.testing.assert_close(model(EVAL).logits, reference, rtol=1e-4, atol=1e-4)
    transform.watch(block, "")
    run_with_input_hooks(block, watched, inputs, transform.observe)
    first = next(iter(before))  # the input of the attention's first linear
    spread = lambda x: float(x.max() / x.median())  # noqa: E731
    assert spread(transform.act_max[first]) < spread(before[first]) / 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_smoothquant_checkpoints_reload_exactly(arch: str, method: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    config = hfquant.HfQuantConfig(**W8A8, method=method, smoothquant=0.5, dataset=TOKENS)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=config)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])
    norm = "model.layers.0.input_layernorm.weight" if arch == "llama" else "transformer.h.0.ln_1.weight"
    assert not torch.equal(model.state_dict()[norm], base.state_dict()[norm])  # the folded scales are in the norm
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == (14 if arch == "llama" else 8)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["smoothquant"] == 0.5 and saved["calibration"]["num_samples"] == 8
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # no data needed
    assert torch.equal(again.state_dict()[norm], model.state_dict()[norm])
    with torch.no_grad():
        assert torch.equal(again(EVAL).logits, model(EVAL).logits)


def test_smoothquant_lowers_w8a8_error_on_outlier_activations(tiny_checkpoints: dict, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    with torch.no_grad():
        for block in base.model.layers:
            block.input_layernorm.weight[[3, 17]] *= 40
            block.post_attention_layernorm.weight[5] *= 40
    base.save_pretrained(tmp_path)
    errors = {}
    for alpha in (None, 0.5):
        config = hfquant.HfQuantConfig(**W8A8, smoothquant=alpha, dataset=TOKENS if alpha else None)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
        with torch.no_grad():
            errors[alpha] = float((model(EVAL).logits - base(EVAL).logits).pow(2).mean())
    assert errors[0.5] < errors[None] / 2, errors


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(smoothquant=1.5), r"smoothquant=1.5 is not allowed; expected a finite number in \[0.0, 1.0\]"),
    (dict(smoothquant="0.5"), "smoothquant='0.5' is not allowed"),
    (dict(smoothquant=True), "smoothquant=True is not allowed"),
    (dict(smoothquant=0.5, method="awq"), "smoothquant=0.5 is not allowed with method='awq'"),
    (dict(smoothquant=0.5, target_bits=4), "smoothquant=0.5 is not allowed with target_bits"),
    (dict(smoothquant=0.5, qat=True), "qat=True is not allowed with method='rtn' and smoothquant"),
])
def test_bad_smoothquant_values_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hfquant.HfQuantConfig(**kwargs)


def test_smoothquant_makes_rtn_take_data() -> None:
    assert hfquant.HfQuantConfig(smoothquant=0.5).calibrated
    hfquant.HfQuantConfig(smoothquant=0.5, dataset=["text"])  # accepted: RTN with smoothing calibrates


def test_an_architecture_without_mappings_fails_before_loading(tmp_path: Path) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"smoothquant needs the layer mappings.*model_type='gpt_neox'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=hfquant.HfQuantConfig(
            smoothquant=0.5, dataset=TOKENS))


def test_cli_quantize_takes_smoothquant(tiny_checkpoints: dict, tmp_path: Path) -> None:
    from hfquant.cli import main

    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    main(["quantize", str(tiny_checkpoints["opt"]), str(tmp_path / "q"), "--format", "int8", "--smoothquant", "0.5",
          "--calib-dataset", str(text), "--num-samples", "2", "--calib-seqlen", "32"])
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["smoothquant"] == 0.5 and saved["calibration"]["num_samples"] == 2
