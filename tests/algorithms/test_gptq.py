import itertools

import pytest
import torch

from hfquant.algorithms import get_method
from hfquant.algorithms.gptq import (
    GPTQOptions,
    HessianAccumulator,
    clipped_params,
    gptq_quantize,
    layer_reconstruction_error,
)
from hfquant.formats import QuantizedWeight
from hfquant.formats.affine import IntAffine

FORMATS = [IntAffine(bits=bits, group_size=group, sym=sym)
           for bits, group, sym in itertools.product((2, 3, 4, 8), (-1, 32, 48), (True, False))]


def _fmt(bits: int, group_size: int = 128, sym: bool = False) -> IntAffine:
    return IntAffine(bits=bits, group_size=group_size, sym=sym)


def _grid(w: torch.Tensor, fmt: IntAffine) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point of ``w`` (the format's full-range grid); symmetric: the fixed zero."""
    params = fmt.choose_params(w)
    return params["scale"], params.get("zero", torch.full_like(params["scale"], fmt.sym_zero))


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntAffine) -> torch.Tensor:
    """Codes of ``w`` on the grid ``(scale, zero)``, written out: ``clamp(round(w / scale) + zero, 0, maxq)``."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, fmt.maxq)


def _zero(q: QuantizedWeight) -> torch.Tensor | None:
    return q.params.get("zero")


def _problem(inp: int = 200, out: int = 32, n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and inputs ``X`` (n, inp) with correlated features and uneven feature scales."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, inp, generator=g)
    A = torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g) / inp**0.5
    X = (Z @ A) * torch.rand(inp, generator=g).add(0.2)
    W = torch.randn(out, inp, generator=g) * 0.05
    return W, X


def _hessian(X: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(X.shape[1])
    acc.add_batch(X)
    return acc.hessian


def _output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W.double() - W_hat.double()) @ X.double().T).norm())


def _reference_gptq(W: torch.Tensor, H: torch.Tensor, fmt: IntAffine, damp: float = 0.01,
                    perm: torch.Tensor | None = None, static: QuantizedWeight | None = None) -> QuantizedWeight:
    """Textbook GPTQ, one column at a time, every later column updated at once (no lazy blocks).

    Group params come from the updated weights when a group starts, or from ``static`` (then the
    columns may be processed in the order ``perm``). Returns everything in the original order.
    """
    W, H = W.clone().float(), H.clone().float()
    rows, columns = W.shape
    perm = torch.arange(columns) if perm is None else perm
    width = fmt.group_width(columns)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(columns)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, fmt.num_groups(columns))
    zeros = torch.zeros_like(scales)
    for c in range(columns):
        g = int(perm[c]) // width
        if static is not None:
            scales[:, g] = static.params["scale"][:, g].float()
            zeros[:, g] = fmt.sym_zero if fmt.sym else static.params["zero"][:, g].float()
        elif c % width == 0:
            scales[:, g], zeros[:, g] = _grid(W[:, c:c + width], fmt)
        codes[:, c] = _round(W[:, c], scales[:, g], zeros[:, g], fmt)
        err = (W[:, c] - (codes[:, c] - zeros[:, g]) * scales[:, g]) / Hinv[c, c]
        W[:, c:] -= err[:, None] * Hinv[c, c:][None, :]
    params = {"scale": scales.half()} if fmt.sym else {"scale": scales.half(), "zero": zeros.to(torch.uint8)}
    return QuantizedWeight(codes[:, torch.argsort(perm)].to(torch.uint8), params, fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_beats_rtn_on_layer_output(fmt: IntAffine) -> None:
    W, X = _problem()
    q = gptq_quantize(W, _hessian(X), fmt)
    assert q.codes.shape == W.shape and q.codes.dtype == torch.uint8 and int(q.codes.max()) <= fmt.maxq
    scale = q.params["scale"]
    assert scale.shape == (W.shape[0], fmt.num_groups(W.shape[1])) and scale.dtype == torch.float16
    assert (_zero(q) is None) == fmt.sym
    assert fmt.sym or (_zero(q).shape == scale.shape and _zero(q).dtype == torch.uint8)
    gptq_err = _output_error(W, q.dequantize(), X)
    rtn_err = _output_error(W, fmt.quantize(W).dequantize(), X)
    assert gptq_err < rtn_err


@pytest.mark.parametrize("group", [-1, 32, 48])
@pytest.mark.parametrize("sym", [True, False])
def test_identity_hessian_is_rtn(group: int, sym: bool) -> None:
    W, _ = _problem(inp=100)
    fmt = _fmt(4, group, sym)
    q = gptq_quantize(W, torch.eye(100), fmt, GPTQOptions(damp_percent=1e-6, block_size=16))
    rtn = fmt.quantize(W)
    assert torch.equal(q.codes, rtn.codes)
    assert torch.equal(q.params["scale"], rtn.params["scale"])
    assert (_zero(q) is None and _zero(rtn) is None) or torch.equal(_zero(q), _zero(rtn))


@pytest.mark.parametrize("fmt", [_fmt(3, -1, False), _fmt(4, 32, True), _fmt(4, 48, False), _fmt(2, 48, True)],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("block_size", [128, 7])
def test_matches_column_by_column_reference(fmt: IntAffine, block_size: int) -> None:
    W, X = _problem(inp=150, seed=1)
    H = _hessian(X)
    q = gptq_quantize(W, H, fmt, GPTQOptions(block_size=block_size))
    ref = _reference_gptq(W, H, fmt)
    assert (q.codes == ref.codes).float().mean() >= 0.995
    err, ref_err = (layer_reconstruction_error(W, x.dequantize(), H) for x in (q, ref))
    assert err == pytest.approx(ref_err, rel=1e-4)


def test_act_order_with_static_groups() -> None:
    W, X = _problem(seed=2)
    H = _hessian(X)
    fmt = _fmt(3, 32, False)
    q = gptq_quantize(W, H, fmt, GPTQOptions(act_order=True))
    static = fmt.quantize(W)
    assert torch.equal(q.params["scale"], static.params["scale"]) and torch.equal(_zero(q), _zero(static))
    assert not torch.equal(q.codes, gptq_quantize(W, H, fmt).codes)
    # the result is in the original column order: it matches the reference run on permuted columns
    perm = torch.argsort(torch.diag(H), descending=True)
    ref = _reference_gptq(W, H, fmt, perm=perm, static=static)
    assert (q.codes == ref.codes).float().mean() >= 0.995
    # and the error it minimised is the one measured on the unpermuted layer
    err = _output_error(W, q.dequantize(), X)
    assert err**2 * 2 / X.shape[0] == pytest.approx(layer_reconstruction_error(W, q.dequantize(), H), rel=1e-4)
    assert err < _output_error(W, static.dequantize(), X)
    assert err < 0.5 * _output_error(W, q.dequantize()[:, perm], X)  # the permuted order would be far off


def test_act_order_needs_static_groups() -> None:
    with pytest.raises(ValueError, match="static_groups"):
        GPTQOptions(act_order=True, static_groups=False)
    assert GPTQOptions(act_order=True).uses_static_groups
    assert not GPTQOptions().uses_static_groups


def test_static_groups_without_act_order_use_original_weights() -> None:
    W, X = _problem(inp=96, seed=3)
    fmt = _fmt(4, 32, True)
    q = gptq_quantize(W, _hessian(X), fmt, GPTQOptions(static_groups=True))
    assert torch.equal(q.params["scale"], fmt.quantize(W).params["scale"])


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns(act_order: bool) -> None:
    W, X = _problem(inp=64, seed=4)
    X[:, [5, 40]] = 0
    fmt = _fmt(4, 32, False)
    q = gptq_quantize(W, _hessian(X), fmt, GPTQOptions(act_order=act_order))
    W_hat = q.dequantize()
    assert torch.isfinite(W_hat).all()
    assert torch.all(W_hat[:, [5, 40]] == 0)
    assert _output_error(W, W_hat, X) < _output_error(W, fmt.quantize(W).dequantize(), X)


@pytest.mark.parametrize("fmt", [_fmt(3, -1, False), _fmt(4, -1, True)], ids=lambda f: f.name)
def test_clipped_params_never_worse_than_full_range(fmt: IntAffine) -> None:
    torch.manual_seed(5)
    w = torch.distributions.StudentT(2.0).sample((32, 128))

    def norm_error(params: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = params["scale"]
        zero = params.get("zero", torch.full_like(scale, fmt.sym_zero))
        assert set(params) == set(fmt.param_dtypes) and scale.dtype == zero.dtype == torch.float32
        q = (_round(w, scale[:, None], zero[:, None], fmt) - zero[:, None]) * scale[:, None]
        return (q - w).abs().pow(2.4).sum(dim=1)

    clipped, full = norm_error(clipped_params(w, fmt)), norm_error(fmt.choose_params(w))
    assert torch.all(clipped <= full) and (clipped < 0.99 * full).float().mean() > 0.5


@pytest.mark.parametrize("fmt", [_fmt(3, -1, False), _fmt(3, 32, True), _fmt(4, -1, True)], ids=lambda f: f.name)
def test_mse_clip_helps_heavy_tailed_weights(fmt: IntAffine) -> None:
    torch.manual_seed(6)
    _, X = _problem(inp=128, seed=6)
    W = torch.distributions.StudentT(2.5).sample((32, 128)) * 0.02
    H = _hessian(X)
    errs = [layer_reconstruction_error(W, gptq_quantize(W, H, fmt, GPTQOptions(mse_clip=m)).dequantize(), H)
            for m in (False, True)]
    assert errs[1] <= errs[0]


def test_hessian_accumulator_matches_one_shot() -> None:
    _, X = _problem(inp=64, n=300)
    acc = HessianAccumulator(64)
    acc.add_batch(X[:100].reshape(4, 25, 64))  # any leading shape; every vector is one sample
    acc.add_batch(X[100:150].double())
    acc.add_batch(X[150:].half())
    X = torch.cat([X[:150], X[150:].half().float()])
    assert acc.num_samples == 300 and acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian, 2 / 300 * X.T @ X, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in_features"):
        acc.add_batch(torch.zeros(3, 65))


@pytest.mark.parametrize("kwargs, field", [
    ({"damp_percent": 0.0}, "damp_percent"), ({"damp_percent": 1.5}, "damp_percent"),
    ({"block_size": 0}, "block_size"), ({"act_order": True, "static_groups": False}, "static_groups"),
])
def test_invalid_options(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GPTQOptions(**kwargs)


def test_input_errors() -> None:
    W, X = _problem(inp=64)
    H = _hessian(X)
    fmt = _fmt(4, 32)
    with pytest.raises(ValueError, match="hessian has shape"):
        gptq_quantize(W, H[:32, :32], fmt)
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(W, H.clone().fill_diagonal_(float("nan")), fmt)
    with pytest.raises(ValueError, match="damp_percent"):
        gptq_quantize(W, -torch.eye(64), fmt)


def test_registered() -> None:
    method = get_method("gptq")
    assert method.calibrated and method.options is GPTQOptions
    assert method.parse_options({"act_order": True}).uses_static_groups
