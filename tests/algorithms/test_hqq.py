"""HQQ-style grid optimisation: never worse than RTN on its error, stored form kept, checkpoints reload exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.algorithms.hqq import HQQOptions, applies_to, half_quadratic, refit, shrink
from hfquant.formats import format_names, make_format

FORMATS = [name for name in format_names() if applies_to(make_format(name)) is None]
FLOAT_CASTS = [name for name in format_names() if name not in FORMATS]


def _group_errors(weight: torch.Tensor, quantized, fmt) -> torch.Tensor:  # noqa: ANN001
    """Mean absolute error per (row, group): what HQQ minimises."""
    error = (weight - quantized.dequantize()).abs()
    return torch.stack([error[:, cols].mean(dim=1) for cols in fmt.group_columns(weight.shape[1])], dim=1)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(FORMATS), rows=st.integers(1, 9), cols=st.integers(1, 80),
       group_size=st.sampled_from([-1, 8, 16, 32]), outliers=st.booleans(), seed=st.integers(0, 2**16))
def test_hqq_is_never_worse_than_rtn_on_its_error(name: str, rows: int, cols: int, group_size: int, outliers: bool,
                                                  seed: int) -> None:
    fmt = make_format(name) if not make_format(name).grouped else make_format(name, group_size=group_size)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    if outliers:
        weight[:, 0] *= 20
    rtn, hqq = fmt.quantize(weight), half_quadratic(weight, fmt, HQQOptions(iterations=5))
    assert bool((_group_errors(weight, hqq, fmt) <= _group_errors(weight, rtn, fmt)).all())
    assert fmt.check_stored(hqq.stored(), cols) is None  # scales and zero points in the format's stored form


def _per_group_reference(weight: torch.Tensor, fmt, options: HQQOptions):  # noqa: ANN001, ANN202
    """HQQ as first written (before batching): one group at a time through ``fmt.quantize``."""

    def one_group(w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = w.float()
        params = fmt.choose_params(w)

        def values(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            grid = {k: v[:, None] for k, v in p.items()}
            codes = fmt.round(w, grid)
            return codes, fmt.dequantize(codes, grid, torch.float32)

        codes, rounded = values(params)
        best, best_error = dict(params), (w - rounded).abs().mean(dim=1)
        beta = options.beta
        for _ in range(options.iterations):
            params = refit(fmt, codes, w - shrink(w - rounded, beta, options.lp_norm), params)
            codes, rounded = values(params)
            error = (w - rounded).abs().mean(dim=1)
            better = error < best_error
            best = {k: torch.where(better, params[k], best[k]) for k in best}
            best_error = torch.minimum(error, best_error)
            beta *= options.kappa
        return best

    return fmt.quantize(weight, choose_params=one_group)


@pytest.mark.parametrize(("name", "shape", "group_size"), [("int4", (7, 100), 32), ("int3", (5, 64), 16),
                                                          ("nf4", (3, 40), -1), ("fp8", (4, 50), 16),
                                                          ("int4", (600, 520), 128)])  # several chunks
def test_batched_groups_equal_one_group_at_a_time(name: str, shape: tuple[int, int], group_size: int) -> None:
    """The layer-at-once optimisation gives the per-group original's grids and codes (short last group too)."""
    fmt = make_format(name, group_size=group_size)
    torch.manual_seed(sum(shape))
    weight = torch.distributions.StudentT(4.0).sample(shape) * 0.02
    options = HQQOptions(iterations=8)
    reference = _per_group_reference(weight, fmt, options)
    batched = half_quadratic(weight, fmt, options)
    assert torch.equal(batched.codes, reference.codes)
    assert batched.params.keys() == reference.params.keys()
    assert all(torch.equal(batched.params[k], reference.params[k]) for k in reference.params)


@pytest.mark.parametrize("name", ["int4", "int3", "nf4", "ternary"])
def test_hqq_lowers_the_error_of_a_real_looking_weight(name: str) -> None:
    """Heavy-tailed weights, the case HQQ is for: the mean absolute error drops by at least 2%."""
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(4.0).sample((64, 256)) * 0.02
    fmt = make_format(name)
    rtn = (weight - fmt.quantize(weight).dequantize()).abs().mean()
    hqq = (weight - half_quadratic(weight, fmt, HQQOptions()).dequantize()).abs().mean()
    assert hqq < 0.98 * rtn, (float(hqq), float(rtn))


def test_refit_recovers_an_exact_affine_grid() -> None:
    fmt = make_format("int4", group_size=16)
    codes = torch.randint(0, 16, (5, 16), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    scale = torch.tensor([0.5, 0.25, 0.125, 1.0, 2.0])
    zero = torch.tensor([3.0, 8.0, 0.0, 15.0, 7.0])
    target = (codes.float() - zero[:, None]) * scale[:, None]
    start = {"scale": torch.ones(5), "zero": torch.zeros(5)}
    fitted = refit(fmt, codes, target, start)
    assert torch.equal(fitted["scale"], scale) and torch.equal(fitted["zero"], zero)


def test_shrink_is_the_lp_proximal_soft_threshold() -> None:
    x = torch.tensor([-2.0, -0.01, 0.0, 0.5, 3.0])
    beta, p = 4.0, 0.7
    expected = [float(torch.sign(v) * max(abs(v) - abs(v) ** (p - 1) / beta, 0.0)) if v != 0 else 0.0 for v in x]
    assert torch.allclose(shrink(x, beta, p), torch.tensor(expected))


@pytest.mark.parametrize("name", FLOAT_CASTS)
def test_formats_without_a_scale_are_refused_at_config_time(name: str) -> None:
    with pytest.raises(ValueError, match=rf"method='hqq' cannot quantize to '{name}'"):
        hfquant.HfQuantConfig(format=name, method="hqq")
    with pytest.raises(ValueError, match="method='hqq' cannot quantize"):
        hfquant.HfQuantConfig(format="int4", method="hqq", rules={"lm_head": name})


@pytest.mark.parametrize(("option", "value"), [("iterations", -1), ("iterations", 1.5), ("lp_norm", 0.0),
                                               ("lp_norm", 1.5), ("beta", 0.0), ("kappa", 0.5), ("kappa", "1")])
def test_bad_options_name_the_field(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{option}="):
        hfquant.HfQuantConfig(method="hqq", **{option: value})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hqq_checkpoint_reloads_bit_exactly(tiny_checkpoints: dict, tmp_path: Path, arch: str) -> None:
    config = hfquant.HfQuantConfig(format="int4", group_size=32, method="hqq", rules={"re:.*\\.0\\..*": "nf4"},
                                   kernels="off")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=config)
    ids = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 1]])
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "hqq")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hqq")
    hfquant.prepare_for_inference(again, kernels="off")
    assert again.config.quantization_config.method == "hqq"
    assert again.config.quantization_config.to_dict()["hqq"] == {"iterations": 20, "lp_norm": 0.7, "beta": 10.0,
                                                                 "kappa": 1.01}
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
