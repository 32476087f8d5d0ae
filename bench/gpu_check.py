"""CUDA check of hfquant's kernels: equivalence with the exact result, then a small timing table.

    python bench/gpu_check.py OUT.json [--device cuda] [--budget-s 150]

Standalone: needs torch and this repository (transformers only for the end-to-end part, skipped
if missing). ``--device cpu`` runs the same checks with the CPU kernels, to try the script out.

1. ``kernel_works`` per kernel and dtype (what ``plan_for`` relies on), and which kernel the
   dispatch table picks per (format, dtype).
2. Equivalence: every kernel of the device, for every format it claims (4-bit per channel and
   groups 32..256, ragged last groups, widened 2/3-bit; int8 per channel sym/asym) and activation
   dtype, at 1, 7 and 2x5 tokens, against a float64 matmul on the oracle's dequantized weight.
3. A ``QuantLinear`` prepared on CPU and moved with ``.to(device)`` repacks for the device.
4. Timing (fastest of a few CUDA-synchronized runs) of kernel vs reference path vs dense, at
   Llama-7B-like shapes and 1..2048 tokens, until ``--budget-s`` runs out.
5. End to end: a tiny quantized Llama on the device generates with ``cache_implementation="static"``
   and compiles with ``fullgraph=True``.

Prints a table and writes everything to OUT.json. Every step records its own errors and carries on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


HFQUANT_IMPORT_ERROR: str | None = None  # why the full package (with transformers) did not import


def _import_kernels() -> tuple[Any, Any, Any, Any, Any, Any]:
    """hfquant's kernel modules; without transformers, skip the package's transformers-importing __init__."""
    global HFQUANT_IMPORT_ERROR
    try:
        import hfquant  # noqa: F401
    except ImportError as exc:
        HFQUANT_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        stub = types.ModuleType("hfquant")
        stub.__path__ = [str(REPO / "hfquant")]
        sys.modules["hfquant"] = stub
    kernels = importlib.import_module("hfquant.nn.kernels")
    affine = importlib.import_module("hfquant.formats.affine")
    fp8 = importlib.import_module("hfquant.formats.fp8")
    packing = importlib.import_module("hfquant.packing")
    schemes = importlib.import_module("hfquant.schemes")
    qlinear = importlib.import_module("hfquant.nn.qlinear")
    return kernels, affine, fp8, packing, schemes, qlinear


kernels, affine, fp8, packing, schemes, qlinear = _import_kernels()


def _fmt(bits: int, group_size: int = 128, sym: bool = False) -> Any:
    """An integer affine format (``hfquant.formats.affine.IntAffine``)."""
    return affine.IntAffine(bits=bits, group_size=group_size, sym=sym)


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
X_SHAPES = ((1,), (7,), (2, 5))
CASES = {  # kernel kind -> [(format, in_features)]
    "int4pack": [(_fmt(4, g, s), k) for g, k in ((32, 256), (64, 256), (128, 256), (256, 512), (-1, 256),
                                                         (128, 576), (128, 200), (512, 1024)) for s in (False, True)]
    + [(_fmt(3, 128), 256), (_fmt(2, 64), 256), (_fmt(3, 64, True), 200)],
    "int8pack": [(_fmt(8, -1, s), k) for s in (True, False) for k in (256, 200)],
    "fp8-scaled-mm": [(fp8.FP8(group_size=-1), k) for k in (256, 576, 4096)],
}
# fp8-scaled-mm rounds the activations to e4m3 as well (W8A8): its bound is that rounding, 2**-4 relative
KIND_TOLERANCE = {"fp8-scaled-mm": 5e-2}
TIMING_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in)
TIMING_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048)
TIMING_FORMATS = {  # name -> (format, activation dtypes)
    "int4 g128": (_fmt(4, 128), (torch.bfloat16,)),
    "int8": (_fmt(8, -1, True), (torch.bfloat16, torch.float16, torch.float32)),
    "int8 asym": (_fmt(8, -1, False), (torch.bfloat16,)),
    "int3 g128 (widen)": (_fmt(3, 128), (torch.bfloat16,)),
    "fp8 (W8A8)": (fp8.FP8(group_size=-1), (torch.bfloat16,)),
}


def _stored(fmt: Any, out_features: int, in_features: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05 + 0.01
    return {k: v.to(device) for k, v in fmt.quantize(weight).stored().items()}


def _oracle_weight(stored: dict[str, torch.Tensor], fmt: Any, in_features: int) -> torch.Tensor:
    """``(q - zero) * scale`` in float32, written out: generic unpacker, per-group values repeated over columns;
    fp8 (per channel): the codes' float8 values times the row scale."""
    if isinstance(fmt, fp8.FP8):
        return stored["weight"].view(fmt.torch_dtype).float() * stored["weight_scale"].float()
    codes = packing.unpack(stored["weight"], fmt.bits, in_features).float()
    width = fmt.group_width(in_features)
    scale = stored["weight_scale"].float().repeat_interleave(width, dim=1)[:, :in_features]
    zero = stored["weight_zero"].float().repeat_interleave(width, dim=1)[:, :in_features] \
        if "weight_zero" in stored else fmt.sym_zero
    return (codes - zero) * scale


def check_availability(device: str) -> dict[str, Any]:
    out: dict[str, Any] = {"kernel_works": {}, "plan_for": {}}
    for kernel in kernels.KERNELS.values():
        if kernel.device_type != torch.device(device).type:
            continue
        for dtype in DTYPES:
            out["kernel_works"][f"{kernel.name} {dtype}"] = kernels.kernel_works(kernel.name, device, dtype)
    for fmt in (_fmt(4, 128), _fmt(8, -1, True), _fmt(8, -1), _fmt(3, 128), fp8.FP8(group_size=-1)):
        for dtype in DTYPES:
            plan = kernels.plan_for(fmt, 4096, 4096, device, dtype)
            out["plan_for"][f"{fmt.name} {dtype}"] = (
                f"{plan.kernel.name} (<= {plan.route.max_tokens} tokens)" if plan else "reference")
    return out


def check_equivalence(device: str) -> list[dict[str, Any]]:
    rows = []
    for kind, cases in CASES.items():
        kernel = kernels.KERNELS.get(f"{kind}-{torch.device(device).type}")
        if kernel is None:  # no such kernel on this device type (fp8-scaled-mm is CUDA only)
            continue
        for (fmt, in_features), dtype in ((c, d) for c in cases for d in DTYPES):
            row: dict[str, Any] = {"kernel": kernel.name, "format": fmt.name, "in_features": in_features,
                                   "dtype": str(dtype)}
            if not kernels.kernel_works(kernel.name, device, dtype):
                rows.append({**row, "unsupported": True})  # plan_for never routes this dtype to the kernel
                continue
            try:
                lay = kernel.layout(fmt, in_features, 48)
                stored = _stored(fmt, 48, in_features, device)
                tensors = kernel.pack(stored, fmt, lay, dtype)
                weight = _oracle_weight({k: v.cpu() for k, v in stored.items()}, fmt, in_features)
                plan = kernels.Plan(kernel, kernels.Route(kernel.name, kernel.device_type, dtype), lay)
                errors = []
                for lead in X_SHAPES:
                    x = torch.randn(*lead, in_features).to(device=device, dtype=dtype)
                    got = plan.linear(x, tensors, None).double().cpu().reshape(-1, 48)
                    exact = x.double().cpu().reshape(-1, in_features) @ weight.double().T
                    errors.append(float((got - exact).abs().max() / exact.abs().max()))
                row.update(max_rel_error=max(errors), ok=max(errors) < KIND_TOLERANCE.get(kind, TOLERANCE[dtype]))
            except Exception as exc:  # noqa: BLE001 (record and carry on)
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            rows.append(row)
    return rows


def check_move(device: str) -> dict[str, Any]:
    fmt = _fmt(4, 128)
    layer = qlinear.QuantLinear(256, 64, schemes.LayerScheme(fmt), bias=True)
    layer.load_quantized(fmt.quantize(torch.randn(64, 256) * 0.05))
    before = layer.prepare_kernel(torch.bfloat16)
    layer.to(device)
    after = layer.kernel_plan.kernel.name if layer.kernel_plan else "reference"
    x = torch.randn(3, 256, dtype=torch.bfloat16, device=device)
    exact = x.double().cpu() @ layer.dequantized_weight(torch.float64).cpu().T + layer.bias.double().cpu()
    err = float((layer(x).double().cpu() - exact).abs().max() / exact.abs().max())
    return {"prepared_on_cpu": before, "after_move": after, "max_rel_error": err, "ok": err < 2e-2}


def _best_ms(fn: Any, device: str, repeats: int = 5) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def timing(device: str, deadline: float) -> list[dict[str, Any]]:
    rows = []
    device_type = torch.device(device).type
    for fname, (fmt, dtypes) in TIMING_FORMATS.items():
        for (out_features, in_features), dtype in ((s, d) for s in TIMING_SHAPES for d in dtypes):
            if time.monotonic() > deadline:
                return rows
            stored = _stored(fmt, out_features, in_features, device)
            dense = torch.randn(out_features, in_features, device=device, dtype=dtype)
            packed = {}
            for kernel in kernels.KERNELS.values():
                if kernel.device_type == device_type and kernel.takes(fmt, widen=True):
                    lay = kernel.layout(fmt, in_features, out_features)
                    if lay is not None and kernels.kernel_works(kernel.name, device, dtype):
                        packed[kernel.name] = (kernel, lay, kernel.pack(stored, fmt, lay, dtype))
            for m in TIMING_TOKENS:
                if time.monotonic() > deadline:
                    return rows
                x = torch.randn(m, in_features, device=device, dtype=dtype)
                row = {"format": fname, "shape": f"{out_features}x{in_features}", "tokens": m, "dtype": str(dtype),
                       "dense_ms": _best_ms(lambda x=x, w=dense: torch.nn.functional.linear(x, w), device),
                       "reference_ms": _best_ms(lambda x=x, s=stored, f=fmt, i=in_features:
                                                kernels.reference_linear(x, s, f, i, None), device)}
                for name, (kernel, lay, tensors) in packed.items():
                    try:
                        row[f"{name}_ms"] = _best_ms(lambda x=x, k=kernel, t=tensors, lt=lay: k.matmul(x, t, lt),
                                                     device)
                    except Exception as exc:  # noqa: BLE001
                        row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                rows.append(row)
    return rows


def _quantized_tiny_llama(device: str) -> torch.nn.Module:
    """A tiny bfloat16 Llama with int4 g64 QuantLinears, via from_pretrained or (without the full
    hfquant import, e.g. no ``datasets``) by swapping its linear layers directly."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    fmt = _fmt(4, 64)
    if HFQUANT_IMPORT_ERROR is None:
        import tempfile

        from transformers import AutoModelForCausalLM

        import hfquant
        with tempfile.TemporaryDirectory() as tmp:
            LlamaForCausalLM(config).save_pretrained(tmp)
            qconfig = hfquant.HfQuantConfig(format=fmt.to_dict())
            return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, device_map=device,
                                                        quantization_config=qconfig)
    model = LlamaForCausalLM(config).eval()
    for name, linear in [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]:
        layer = qlinear.QuantLinear(linear.in_features, linear.out_features, schemes.LayerScheme(fmt), bias=False)
        layer.load_quantized(fmt.quantize(linear.weight.detach()))
        parent, _, child = name.rpartition(".")
        setattr(model.model.layers.get_submodule(parent), child, layer)
    model.to(device=device, dtype=torch.bfloat16)
    qlinear.prepare_for_inference(model)
    return model


def end_to_end(device: str) -> dict[str, Any]:
    model = _quantized_tiny_llama(device)
    kernels_used = sorted({m.kernel_plan.kernel.name if m.kernel_plan else "reference"
                           for m in model.modules() if isinstance(m, qlinear.QuantLinear)})
    ids = torch.tensor([[5, 17, 99, 3, 42, 64, 8]], device=device)
    dynamic = model.generate(ids, max_new_tokens=6, do_sample=False)
    static = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # no graph breaks in QuantLinear.forward
    with torch.no_grad():
        same = torch.allclose(compiled(ids).logits.float(), model(ids).logits.float(), rtol=1e-3, atol=1e-3)
    ok = bool(torch.equal(static, dynamic)) and same and kernels_used != ["reference"]
    return {"built_with": "from_pretrained" if HFQUANT_IMPORT_ERROR is None else "module swap",
            "kernels": kernels_used, "static_equals_dynamic": bool(torch.equal(static, dynamic)),
            "fullgraph_compile_matches": same, "ok": ok}


def _step(name: str, fn: Any, report: dict[str, Any]) -> None:
    t0 = time.monotonic()
    try:
        report[name] = fn()
    except Exception:  # noqa: BLE001
        report[name] = {"ok": False, "error": traceback.format_exc()[-2000:]}
    print(f"[{name}] {time.monotonic() - t0:.1f}s", flush=True)


def _print(report: dict[str, Any]) -> None:
    print("\n== availability ==")
    for key, value in report.get("availability", {}).get("kernel_works", {}).items():
        print(f"  {key}: {value}")
    for key, value in report.get("availability", {}).get("plan_for", {}).items():
        print(f"  plan {key}: {value}")
    eq = report.get("equivalence", [])
    if isinstance(eq, list):
        run = [r for r in eq if not r.get("unsupported")]
        bad = [r for r in run if not r.get("ok")]
        print(f"\n== equivalence: {len(run) - len(bad)}/{len(run)} ok "
              f"({len(eq) - len(run)} kernel/dtype pairs unsupported by this torch, skipped) ==")
        for r in bad:
            print("  FAIL", r)
        worst = max((r for r in run if "max_rel_error" in r), key=lambda r: r["max_rel_error"], default=None)
        print("  worst:", worst)
    print(f"\ntorch {report.get('torch')}, python {report.get('python')}, {report.get('device_name')}; "
          f"hfquant import: {report.get('hfquant_import_error') or 'ok'}")
    print("\n== move ==", report.get("move"))
    print("== end to end ==", report.get("end_to_end"))
    rows = report.get("timing", [])
    if isinstance(rows, list) and rows:
        names = sorted({k[:-3] for r in rows for k in r if k.endswith("_ms")} - {"dense", "reference"})
        print("\n| format | dtype | shape | tokens | dense ms | reference ms | " + " | ".join(names) + " |")
        for r in rows:
            cells = [f"{r[n + '_ms']:.3f} ({r['reference_ms'] / r[n + '_ms']:.1f}x ref, "
                     f"{r['dense_ms'] / r[n + '_ms']:.2f}x dense)" if n + "_ms" in r else r.get(n + "_error", "-")
                     for n in names]
            print(f"| {r['format']} | {r['dtype'][6:]} | {r['shape']} | {r['tokens']} | {r['dense_ms']:.3f} | "
                  f"{r['reference_ms']:.3f} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the JSON report")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop timing after this many seconds overall")
    args = parser.parse_args()
    start = time.monotonic()
    device = args.device
    report: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0], "device": device,
                              "hfquant_import_error": HFQUANT_IMPORT_ERROR,
                              "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    if device.startswith("cuda") and not torch.cuda.is_available():
        report["error"] = "CUDA is not available"
    else:
        _step("availability", lambda: check_availability(device), report)
        _step("equivalence", lambda: check_equivalence(device), report)
        _step("move", lambda: check_move(device), report)
        _step("end_to_end", lambda: end_to_end(device), report)
        _step("timing", lambda: timing(device, start + args.budget_s), report)
    report["seconds"] = time.monotonic() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    _print(report)
    print(f"\nwrote {args.out} ({report['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
