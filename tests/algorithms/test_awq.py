"""AWQ: the searches never lose to RTN on their error, scaling keeps the float model, checkpoints reload exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.algorithms.awq import AWQOptions, AWQTransform, output_error, search_clip, search_scales
from hfquant.calibration.pipeline import capture_block_inputs, find_blocks, run_with_input_hooks
from hfquant.formats import format_names, make_format
from hfquant.nn.qlinear import QuantLinear
from tiny_models import build

TOKENS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
EVAL = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))


def _format(name: str, group_size: int):  # noqa: ANN202
    fmt = make_format(name)
    return make_format(name, group_size=group_size) if fmt.grouped else fmt


def _inputs(tokens: int, features: int, gen: torch.Generator, outliers: bool) -> torch.Tensor:
    x = torch.randn(tokens, features, generator=gen)
    if outliers:
        x[:, :3] *= 25
    return x


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(format_names()), rows=st.integers(1, 12), cols=st.integers(2, 70),
       group_size=st.sampled_from([-1, 8, 32]), outliers=st.booleans(), seed=st.integers(0, 2**16))
def test_scale_search_is_never_worse_than_rtn(name: str, rows: int, cols: int, group_size: int, outliers: bool,
                                              seed: int) -> None:
    fmt = _format(name, group_size)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(rows, cols, generator=gen) * 0.05, torch.randn(rows + 1, cols, generator=gen) * 0.05]
    x = _inputs(64, cols, gen, outliers)
    hessian = x.T @ x / len(x)
    scales, errors = search_scales(weights, [fmt, fmt], hessian, x.abs().mean(dim=0), grid=10)
    rtn = sum(float(output_error(w, fmt.quantize(w).dequantize(), hessian).sum()) for w in weights)
    assert errors[0] == pytest.approx(rtn, rel=1e-6, abs=1e-12)  # alpha = 0 is round-to-nearest
    best = sum(float(output_error(w, fmt.quantize(w * scales).dequantize() / scales, hessian).sum()) for w in weights)
    assert best == pytest.approx(min(errors), rel=1e-6, abs=1e-12) and best <= rtn * (1 + 1e-6) + 1e-12


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(format_names()), rows=st.integers(1, 12), cols=st.integers(2, 70),
       group_size=st.sampled_from([-1, 8, 32]), seed=st.integers(0, 2**16))
def test_clip_search_is_never_worse_than_no_clipping(name: str, rows: int, cols: int, group_size: int,
                                                     seed: int) -> None:
    fmt = _format(name, group_size)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    weight[:, 0] *= 8  # a weight outlier: clipping it can pay
    x = _inputs(64, cols, gen, outliers=False)
    hessian = x.T @ x / len(x)
    clipped = search_clip(weight, fmt, hessian, clip_grid=20, max_shrink=0.5)
    for cols_ in fmt.group_columns(cols):
        w, h = weight[:, cols_], hessian[cols_, cols_]
        plain = output_error(w, fmt.quantize(w).dequantize(), h)
        searched = output_error(w, fmt.quantize(clipped[:, cols_]).dequantize(), h)
        assert bool((searched <= plain * (1 + 1e-5) + 1e-12).all())


def test_searches_pay_on_outliers() -> None:
    fmt = make_format("int4", group_size=32)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=gen) * 0.05
    x = _inputs(256, 64, gen, outliers=True)
    hessian = x.T @ x / len(x)
    _, errors = search_scales([weight], [fmt], hessian, x.abs().mean(dim=0), grid=20)
    assert min(errors) < 0.7 * errors[0]
    weight[:, 40] *= 10
    plain = output_error(weight, fmt.quantize(weight).dequantize(), hessian).sum()
    clipped = output_error(weight, fmt.quantize(search_clip(weight, fmt, hessian, 20, 0.5)).dequantize(), hessian)
    assert clipped.sum() < 0.9 * plain


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_awq_scaling_leaves_the_float_model_unchanged(arch: str) -> None:
    model = build(arch)
    with torch.no_grad():
        reference = model(EVAL).logits
    blocks = find_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    formats = {n: make_format("int3", group_size=16) for n, m in model.named_modules()
               if n.startswith(names[id(blocks[0])] + ".") and type(m).__name__ in ("Linear", "Conv1D")}
    transform = AWQTransform(AWQOptions(clip=False), formats, model.config)
    prefix = names[id(blocks[0])] + "."
    before = {n: p.clone() for n, p in blocks[0].named_parameters()}
    run_with_input_hooks(blocks[0], transform.watch(blocks[0], prefix),
                         capture_block_inputs(model, blocks[0], list(TOKENS.split(4))), transform.observe)
    transform.apply(blocks[0], prefix)
    assert any(not torch.equal(p, before[n]) for n, p in blocks[0].named_parameters())  # something was scaled
    with torch.no_grad():
        torch.testing.assert_close(model(EVAL).logits, reference, rtol=1e-4, atol=1e-4)


def _outlier_llama(path: Path, tiny_checkpoints: dict) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    with torch.no_grad():
        for block in base.model.layers:
            block.input_layernorm.weight[[3, 17]] *= 20
            block.post_attention_layernorm.weight[5] *= 20
    base.save_pretrained(path)
    return base


def _error(model: torch.nn.Module, base: torch.nn.Module) -> float:
    with torch.no_grad():
        return float((model(EVAL).logits - base(EVAL).logits).pow(2).mean())


@pytest.mark.parametrize("solver", ["rtn", "gptq"])
def test_awq_beats_rtn_and_reloads_exactly(solver: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    base = _outlier_llama(tmp_path / "float", tiny_checkpoints)
    fmt = dict(bits=3, group_size=16)
    rtn = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=hfquant.HfQuantConfig(**fmt))
    awq = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=hfquant.HfQuantConfig(
        **fmt, method="awq", solver=solver, dataset=TOKENS))
    assert sum(isinstance(m, QuantLinear) for m in awq.modules()) == 14
    assert _error(awq, base) < _error(rtn, base)
    awq.save_pretrained(tmp_path / "awq")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "awq")
    assert again.config.quantization_config.options == AWQOptions(solver=solver)
    norm = "model.layers.1.post_attention_layernorm.weight"
    assert not torch.equal(again.state_dict()[norm], base.state_dict()[norm])  # folded scales, saved
    with torch.no_grad():
        assert torch.equal(again(EVAL).logits, awq(EVAL).logits)


@pytest.mark.parametrize("name", ["nf4", "fp8", "ternary"])
def test_awq_takes_other_formats(name: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    awq = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["opt"], quantization_config=hfquant.HfQuantConfig(
        format=name, method="awq", dataset=TOKENS))
    awq.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(EVAL).logits, awq(EVAL).logits)


@pytest.mark.parametrize(("option", "value"), [("grid", 0), ("grid", 2.5), ("clip", 1), ("clip_grid", -1),
                                               ("max_shrink", 1.0), ("max_shrink", -0.1), ("solver", "hqq")])
def test_bad_options_are_named(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{option}={value!r} is not allowed"):
        hfquant.HfQuantConfig(method="awq", **{option: value})
    with pytest.raises(ValueError, match=rf"{option}={value!r} is not allowed"):
        AWQOptions(**{option: value})
