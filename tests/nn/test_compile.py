"""``torch.compile`` of quantized layers and models: no graph breaks, same answers as eager.

Most checks compile with the ``aot_eager`` backend: dynamo capture plus AOT tracing with fake
tensors and functionalization (so the kernels' meta functions and the reference path's in-place
dequantization are exercised), without inductor's C++ compile. One layer test runs inductor for
real (~20 s on a cold inductor cache, ~5 s warm); the whole-model inductor run is ``slow``.

Tolerances (max |compiled - eager| / max |eager|): float32 1e-5, float16 2e-3, bfloat16 2e-2,
as in ``test_kernels.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModelForCausalLM, CompileConfig

import hfquant
from hfquant.formats.affine import IntAffine
from hfquant.nn import kernels
from hfquant.nn.qlinear import QuantLinear
from hfquant.schemes import LayerScheme

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 120, 77, 1, 2, 31, 9]])
NEW_TOKENS = 8


def _fmt(bits: int, group_size: int = 128, sym: bool = False) -> IntAffine:
    return IntAffine(bits=bits, group_size=group_size, sym=sym)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(fmt: IntAffine, in_features: int, out_features: int, dtype: torch.dtype, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = QuantLinear(in_features, out_features, LayerScheme(fmt), bias=True, dtype=dtype)
    layer.load_quantized(fmt.quantize(torch.randn(out_features, in_features, generator=gen) * 0.05 + 0.01))
    layer.bias.data.copy_(torch.randn(out_features, generator=gen))
    return layer


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


# ------------------------------------------------------------------------------------------------
# One layer
# ------------------------------------------------------------------------------------------------

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (fmt, in_features, out_features, activation dtype, prepare: no / yes / widen, input leading dims, kernel or None)
LAYER_CASES = {
    "reference-int4g32-float32": (_fmt(4, 32), 256, 64, F32, "no", (2, 3), None),
    "reference-int4g32-bfloat16": (_fmt(4, 32), 256, 64, BF16, "no", (2, 3), None),
    # 3-bit codes straddle bytes (the unpacker's per-code loop); 200 columns: a short last group
    "reference-int3g48-float32": (_fmt(3, 48), 200, 40, F32, "no", (2, 3), None),
    "reference-int3g48-bfloat16": (_fmt(3, 48), 200, 40, BF16, "no", (2, 3), None),
    "reference-int8-float16": (_fmt(8, -1), 200, 40, F16, "no", (3,), None),
    "int4pack-bfloat16-1token": (_fmt(4, 32), 256, 64, BF16, "yes", (1, 1), "int4pack-cpu"),
    "int4pack-bfloat16-batch": (_fmt(4, 32), 256, 64, BF16, "yes", (2, 5), "int4pack-cpu"),
    "int4pack-bfloat16-padded-input": (_fmt(4, 128), 200, 64, BF16, "yes", (1, 3), "int4pack-cpu"),
    "int4pack-bfloat16-widened-3bit": (_fmt(3, 64, sym=True), 200, 48, BF16, "widen", (1, 2), "int4pack-cpu"),
    "int4pack-float32-1token": (_fmt(4, 32), 256, 64, F32, "yes", (1, 1), "int4pack-cpu"),
    "int8pack-bfloat16-sym": (_fmt(8, -1, sym=True), 200, 64, BF16, "yes", (1, 3), "int8pack-cpu"),
    "int8pack-bfloat16-asym": (_fmt(8, -1), 200, 64, BF16, "yes", (1, 3), "int8pack-cpu"),  # zero correction
    "int8pack-float32-1token-sym": (_fmt(8, -1, sym=True), 200, 64, F32, "yes", (1, 1), "int8pack-cpu"),
    "int8pack-float32-1token-asym": (_fmt(8, -1), 200, 64, F32, "yes", (1, 1), "int8pack-cpu"),
    "int8pack-float16-1token": (_fmt(8, -1, sym=True), 256, 64, F16, "yes", (1, 1), "int8pack-cpu"),
    "dequant-mm-float32-long": (_fmt(4, 32), 256, 64, F32, "yes", (2, 70), "dequant-mm-cpu"),
    "dequant-mm-float16-long-3bit": (_fmt(3, 48), 200, 40, F16, "yes", (1, 20), "dequant-mm-cpu"),
}
KERNEL_OPS = tuple(op for k in kernels.KERNELS.values() for op in k.ops)


def _assert_one_graph(layer: QuantLinear, x: torch.Tensor, kernel: str | None) -> None:
    """``explain``: no graph break, one graph, calling ``kernel``'s matmul op (None: no kernel op)."""
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code
    if kernel is None or not kernels.KERNELS[kernel].ops:  # reference path, or dequant-mm (the reference's maths)
        assert not any(op in code for op in KERNEL_OPS), f"the reference path should call no kernel:\n{code}"
    else:
        op = kernels.KERNELS[kernel].ops[-1]  # the matmul op
        assert f"aten.{op}(" in code, f"the compiled graph lost the {kernel} call:\n{code}"


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_compiles_in_one_graph_and_matches_eager(case: str) -> None:
    fmt, in_features, out_features, dtype, prepare, lead, kernel = LAYER_CASES[case]
    if kernel and not kernels.kernel_works(kernel, "cpu", dtype):
        pytest.skip(f"{kernel} does not run with {dtype} in this torch build")
    layer = _layer(fmt, in_features, out_features, dtype)
    if prepare != "no":
        assert kernel in layer.prepare_kernel(dtype, widen=prepare == "widen").split("+")
    x = torch.randn(*lead, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    running = next((p.kernel.name for p in layer.kernel_plans if p.handles(x)), None)
    assert running == kernel

    _assert_one_graph(layer, x, kernel)

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x), layer(x)
    assert got.shape == want.shape and got.dtype == want.dtype == dtype
    assert _relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("mode", kernels.KERNEL_MODES)
@pytest.mark.parametrize("fmt", [_fmt(4, 32), _fmt(8, -1)], ids=lambda f: f.name)
def test_float32_layer_compiles_in_each_kernel_mode(fmt: IntAffine, mode: str) -> None:
    layer = _layer(fmt, 256, 64, F32)
    name = layer.prepare_kernel(F32, mode=mode).split("+")[0]  # the plan of 1 token
    assert name == ("reference" if mode == "off" else f"int{fmt.bits}pack-cpu")
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(4))
    _assert_one_graph(layer, x, None if name == "reference" else name)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x), layer(x)
    assert got.dtype == F32 and _relative_error(got, want) < TOLERANCE[F32]


def test_compiled_layer_follows_token_limit_and_kernel_release() -> None:
    """Guards send each input to the path eager would take, with few recompiles."""
    layer = _layer(_fmt(4, 32), 256, 64, BF16)
    assert layer.prepare_kernel(BF16) == "int4pack-cpu"
    limit = layer.kernel_plan.route.max_tokens
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for tokens in (1, 3, limit, limit + 1, 2 * limit, 1, 7):  # kernel, kernel, kernel, reference, ...
            x = torch.randn(1, tokens, 256, generator=gen).to(BF16)
            assert _relative_error(compiled(x), layer(x)) < TOLERANCE[BF16], f"{tokens} tokens"
        # 1 token (specialized), then one dynamic-shape graph per path: kernel / reference
        assert counter.frame_count <= 3, f"{counter.frame_count} compiles for 2 paths"
        x = torch.randn(1, 3, 256, generator=gen).to(BF16)
        kernel_out = compiled(x)
        layer.release_kernel()  # the compiled module must notice it is back on the reference path
        reference_out = compiled(x)
        assert torch.equal(reference_out, layer(x))
        assert not torch.equal(reference_out, kernel_out)  # the two paths round differently
        layer.prepare_kernel(BF16)
        assert torch.equal(compiled(x), kernel_out)


def test_inductor_layer_matches_eager() -> None:
    """A real inductor compile: the int4 kernel at 1 token, the fused reference path past the token limit."""
    layer = _layer(_fmt(4, 32), 256, 64, BF16)
    assert layer.prepare_kernel(BF16) == "int4pack-cpu"
    compiled = torch.compile(layer, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tokens in (1, layer.kernel_plan.route.max_tokens + 1):
            x = torch.randn(1, tokens, 256, generator=gen).to(BF16)
            assert _relative_error(compiled(x), layer(x)) < TOLERANCE[BF16], f"{tokens} tokens"


# ------------------------------------------------------------------------------------------------
# Whole tiny models: generation with a static cache, eager and compiled
# ------------------------------------------------------------------------------------------------

MODEL_DTYPES = [torch.bfloat16, torch.float32]


def _load(path, dtype: torch.dtype, **fmt) -> torch.nn.Module:
    config = hfquant.HfQuantConfig(**(fmt or {"bits": 4, "group_size": 32}))
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config)


@pytest.fixture(scope="module")
def llamas(tiny_checkpoints: dict) -> dict[torch.dtype, torch.nn.Module]:
    """The tiny Llama quantized int4 g32, per activation dtype."""
    models = {dtype: _load(tiny_checkpoints["llama"], dtype) for dtype in MODEL_DTYPES}
    for model in models.values():
        assert {m.kernel_plan and m.kernel_plan.kernel.name for m in model.modules()
                if isinstance(m, QuantLinear)} == {"int4pack-cpu"}
    return models


def _generate(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    return model.generate(IDS, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


@pytest.fixture(scope="module")
def eager_tokens(llamas: dict) -> dict[torch.dtype, torch.Tensor]:
    return {dtype: _generate(model, cache_implementation="static") for dtype, model in llamas.items()}


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
def test_static_cache_generate_matches_dynamic_cache(dtype: torch.dtype, llamas: dict, eager_tokens: dict) -> None:
    static = eager_tokens[dtype]
    assert static.shape == (1, IDS.shape[1] + NEW_TOKENS)
    assert torch.equal(static, _generate(llamas[dtype]))


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
def test_compiled_forward_generates_same_tokens(dtype: torch.dtype, llamas: dict, eager_tokens: dict,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.forward = torch.compile(model.forward, fullgraph=True)``: a graph break would raise."""
    model = llamas[dtype]
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(model, "forward", torch.compile(model.forward, backend=counter, fullgraph=True))
    assert torch.equal(_generate(model, cache_implementation="static"), eager_tokens[dtype])
    assert counter.frame_count == 2, "expected one prefill and one decode graph (a static cache keeps shapes fixed)"
    assert torch.equal(_generate(model, cache_implementation="static"), eager_tokens[dtype])
    assert counter.frame_count == 2, "a second generate should reuse both graphs"


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
def test_generate_compile_config_compiles_decode(dtype: torch.dtype, tiny_checkpoints: dict, eager_tokens: dict
                                                 ) -> None:
    """transformers' own path: ``compile_config`` + static cache compiles the decoding step.

    On CPU transformers compiles only with ``CompileConfig._compile_all_devices`` set, and only for
    quantizers whose ``is_compileable`` is True (see ``test_quantizer_lets_generate_compile``).
    """
    model = _load(tiny_checkpoints["llama"], dtype)
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True
    torch._dynamo.utils.counters.clear()
    tokens = _generate(model, cache_implementation="static", compile_config=config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "generate did not compile the decode step"
    assert torch.equal(tokens, eager_tokens[dtype])


def test_quantizer_lets_generate_compile(llamas: dict) -> None:
    assert llamas[torch.bfloat16].hf_quantizer.is_compileable


@pytest.mark.parametrize("arch, fmt", [("qwen2", {"bits": 8, "group_size": -1}), ("opt", {"bits": 4, "group_size": 32}),
                                       ("gpt2", {"bits": 3, "group_size": 64})])
def test_other_architectures_compile_in_one_graph(arch: str, fmt: dict, tiny_checkpoints: dict) -> None:
    """Biases (qwen2 q/k/v, OPT), GPT-2's transposed source layers, int8 / int4 / reference paths."""
    model = _load(tiny_checkpoints[arch], torch.bfloat16, **fmt)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(IDS).logits, model(IDS).logits)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
def test_inductor_compiled_forward_generates_same_tokens(dtype: torch.dtype, llamas: dict, eager_tokens: dict,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor on the whole model (20-30 s per dtype on 2 cores)."""
    model = llamas[dtype]
    monkeypatch.setattr(model, "forward", torch.compile(model.forward, fullgraph=True))
    assert torch.equal(_generate(model, cache_implementation="static"), eager_tokens[dtype])
