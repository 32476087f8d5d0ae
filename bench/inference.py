"""Inference speed of hfquant formats on this machine, and where each kernel beats the reference path.

    python bench/inference.py            # synthetic Llama-shaped stack (hidden 2048, intermediate 5632)
    python bench/inference.py --micro    # one layer: kernel vs reference path by token count
    python bench/inference.py --bundled  # also rows for the bundled SmolLM2-135M (if it is available)

Stack mode builds a ``LlamaForCausalLM`` from a config with random weights, saves it once, and for
each format loads it in a fresh process (``from_pretrained(..., quantization_config=...)``, so the
quantizer's kernel preparation runs as it would for a user). It measures prefill tokens/s on a
512-token input, decode tokens/s at batch 1 and 8 (single-token forwards with a KV cache), and the
process's peak RSS. Ratios are against float32 in the same run. Writes
``bench/results/inference.{json,md}``; ``--micro`` writes ``bench/results/inference_micro.{json,md}``,
the numbers behind :data:`hfquant.nn.kernels.ROUTES`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, environment, rss_mib, write_results  # noqa: E402

from hfquant.formats import WeightFormat  # noqa: E402
from hfquant.formats.affine import IntAffine  # noqa: E402
from hfquant.nn import kernels  # noqa: E402

# name -> (HfQuantConfig kwargs or None for float, activation dtype, kernels: "auto" as loaded,
# "off" = reference path only (kernels released), "widen" = 2/3-bit codes widened onto the int4 kernel)
FORMATS: dict[str, tuple[dict | None, str, str]] = {
    "fp32": (None, "float32", "auto"),
    "bf16": (None, "bfloat16", "auto"),
    "int8 (fp32 act)": ({"bits": 8, "group_size": -1}, "float32", "auto"),
    "int8 (fp32 act, no kernels)": ({"bits": 8, "group_size": -1}, "float32", "off"),
    "int8 (bf16 act)": ({"bits": 8, "group_size": -1}, "bfloat16", "auto"),
    "int8 (bf16 act, no kernels)": ({"bits": 8, "group_size": -1}, "bfloat16", "off"),
    "int4 g128 (fp32 act)": ({"bits": 4, "group_size": 128}, "float32", "auto"),
    "int4 g128 (fp32 act, no kernels)": ({"bits": 4, "group_size": 128}, "float32", "off"),
    "int4 g128 (bf16 act)": ({"bits": 4, "group_size": 128}, "bfloat16", "auto"),
    "int4 g128 (bf16 act, no kernels)": ({"bits": 4, "group_size": 128}, "bfloat16", "off"),
    "int3 g128 (bf16 act)": ({"bits": 3, "group_size": 128}, "bfloat16", "auto"),
    "int3 g128 (bf16 act, widen)": ({"bits": 3, "group_size": 128}, "bfloat16", "widen"),
    "int2 g64 (bf16 act)": ({"bits": 2, "group_size": 64}, "bfloat16", "auto"),
    "int2 g64 (bf16 act, widen)": ({"bits": 2, "group_size": 64}, "bfloat16", "widen"),
}
STACK = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=4096, max_position_embeddings=1024)


def best_ms(fn: Callable[[], object], repeats: int = 5, budget_s: float = 3.0) -> float:
    """Fastest of ``repeats`` runs (after one warm-up), in ms; stops early past ``budget_s``.

    The minimum, not the mean: on a shared machine the noise only ever adds time.
    """
    fn()
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 2:
            break
    return min(times) * 1e3


# ------------------------------------------------------------------------------------------------
# --micro: one layer, kernel vs reference
# ------------------------------------------------------------------------------------------------

MICRO_FORMATS = {"int8": IntAffine(bits=8, group_size=-1, sym=True),
                 "int8 asym": IntAffine(bits=8, group_size=-1, sym=False),
                 "int4 g128": IntAffine(bits=4, group_size=128, sym=False),
                 "int3 g128": IntAffine(bits=3, group_size=128, sym=False),
                 "int2 g64": IntAffine(bits=2, group_size=64, sym=False)}
MICRO_SHAPES = ((5632, 2048), (2048, 5632))  # (out, in): gate/up and down projections
MICRO_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 512)
MICRO_DTYPES = ("bfloat16", "float32", "float16")


def _micro_plans(fmt: WeightFormat, layers: list[tuple[int, int, dict]], dtype: torch.dtype
                 ) -> dict[str, list[tuple[kernels.Plan, dict]]]:
    """Per column name, each layer's plan and kernel tensors: every CPU kernel taking ``fmt``, computing
    in ``dtype``, and for float32 activations also in bfloat16 (the ``compute_dtype`` routes)."""
    computes = [dtype] + ([torch.bfloat16] if dtype == torch.float32 else [])
    plans = {}
    for kernel in kernels.KERNELS.values():
        layouts = [kernel.layout(fmt, i, o) for i, o, _ in layers]
        if kernel.device_type != "cpu" or not kernel.takes(fmt, widen=True) or not all(layouts):
            continue
        for compute in computes:
            route = kernels.Route(kernel.name, "cpu", dtype, compute_dtype=compute)
            name = kernel.name if compute == dtype else f"{kernel.name} via {str(compute).removeprefix('torch.')}"
            plans[name] = [(kernels.Plan(kernel, route, lay), kernel.pack(stored, fmt, lay, compute))
                           for lay, (_, _, stored) in zip(layouts, layers, strict=True)]
    return plans


def micro(tokens: tuple[int, ...], dtypes: tuple[str, ...], formats: dict[str, WeightFormat]) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for fname, fmt in formats.items():
        layers = []
        for out_features, in_features in MICRO_SHAPES:
            weight = torch.randn(out_features, in_features, generator=gen) * 0.02
            layers.append((in_features, out_features, fmt.quantize(weight).stored()))
        for dname in dtypes:
            dtype = getattr(torch, dname)
            plans = _micro_plans(fmt, layers, dtype)
            lost_by_far: set[str] = set()  # kernels already 3x slower than the reference at fewer tokens
            for m in tokens:
                xs = [torch.randn(m, i, generator=gen).to(dtype) for i, _, _ in layers]
                ref = sum(best_ms(lambda x=x, i=i, s=s, f=fmt: kernels.reference_linear(x, s, f, i, None))
                          for x, (i, _, s) in zip(xs, layers, strict=True))
                dense = [torch.randn(o, i, generator=gen).to(dtype) for i, o, _ in layers]
                row = {"format": fname, "dtype": dname, "tokens": m, "reference_ms": ref,
                       "dense_ms": sum(best_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w))
                                       for x, w in zip(xs, dense, strict=True))}
                for name in (name for name in plans if name not in lost_by_far):
                    row[f"{name}_ms"] = sum(best_ms(lambda x=x, pt=pt: pt[0].linear(x, pt[1], None))
                                            for x, pt in zip(xs, plans[name], strict=True))
                    if row[f"{name}_ms"] > 3 * ref:
                        lost_by_far.add(name)
                rows.append(row)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def micro_table(rows: list[dict]) -> str:
    names = sorted({k[:-3] for r in rows for k in r if k.endswith("_ms") and k not in ("reference_ms", "dense_ms")})
    head = "| format | act dtype | tokens | dense float ms | reference ms | " + " | ".join(
        f"{n} ms (speedup vs reference)" for n in names) + " |"
    lines = [head, "|" + "---|" * (5 + len(names))]
    for r in rows:
        cells = [f"{r[n + '_ms']:.1f} ({r['reference_ms'] / r[n + '_ms']:.2f}x)" if n + "_ms" in r else "-"
                 for n in names]
        lines.append(f"| {r['format']} | {r['dtype']} | {r['tokens']} | {r['dense_ms']:.1f} | "
                     f"{r['reference_ms']:.1f} | " + " | ".join(cells) + " |")
    shapes = ", ".join(f"{o}x{i}" for o, i in MICRO_SHAPES)
    return (f"One gate/up + one down projection (out x in: {shapes}), summed; fastest of up to 5 runs. "
            "'dense float' is an unquantized F.linear in the same dtype, for scale. '-': not applicable, or "
            "not timed past a token count where the kernel was already 3x slower than the reference.\n\n"
            + "\n".join(lines))


# ------------------------------------------------------------------------------------------------
# Stack mode: whole models, one fresh process per format
# ------------------------------------------------------------------------------------------------

PREFILL_TOKENS = 512
DECODE_STEPS = {1: 16, 8: 8}  # batch -> single-token steps timed
PROMPT_TOKENS = 16  # context before the timed decode steps


def measure(model_path: str, spec: tuple[dict | None, str, bool]) -> dict:
    """Load ``model_path`` in ``spec``'s format and time prefill and decode (runs in a child process)."""
    from collections import Counter

    from _common import PeakMemory
    from transformers import AutoModelForCausalLM

    import hfquant
    from hfquant.nn.qlinear import QuantLinear, prepare_for_inference

    qconfig, dtype_name, kernel_mode = spec
    load_avg = round(os.getloadavg()[0], 1)  # > ~2 on this 2-core machine: other processes skew the numbers
    dtype = getattr(torch, dtype_name)
    with PeakMemory() as peak:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, quantization_config=hfquant.HfQuantConfig(**qconfig) if qconfig else None)
        if kernel_mode == "widen":
            prepare_for_inference(model, widen=True)
        for layer in (m for m in model.modules() if kernel_mode == "off" and isinstance(m, QuantLinear)):
            layer.release_kernel()
        load_s = time.perf_counter() - start
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        kernel_bytes = sum(t.numel() * t.element_size() for m in layers for t in m.kernel_tensors().values())
        stored_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        used = Counter(m.kernel_plan.kernel.name if m.kernel_plan else "reference" for m in layers)
        rss_loaded = rss_mib()
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            ids = torch.randint(vocab, (1, PREFILL_TOKENS), generator=gen)
            prefill_ms = best_ms(lambda: model(ids, use_cache=False), repeats=3, budget_s=10.0)
            decode = {}
            for batch, steps in DECODE_STEPS.items():
                out = model(torch.randint(vocab, (batch, PROMPT_TOKENS), generator=gen), use_cache=True)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
                step_s = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    out = model(token, cache=cache, use_cache=True)
                    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
                    step_s.append(time.perf_counter() - t0)
                decode[batch] = batch / statistics.median(step_s)
    return {"load_avg": load_avg, "load_s": load_s, "kernels": dict(used), "stored_mib": stored_bytes / 2**20,
            "kernel_mib": kernel_bytes / 2**20, "rss_after_load_mib": rss_loaded, "peak_rss_mib": peak.peak_rss_mib(),
            "prefill_tok_s": PREFILL_TOKENS / (prefill_ms / 1e3),
            **{f"decode_b{b}_tok_s": v for b, v in decode.items()}}


def run_child(model_path: str, name: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", model_path, name], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        return {"error": proc.stderr[-1500:]}
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def synthetic_checkpoint(folder: Path, layers: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **STACK))
    model.save_pretrained(folder)
    return str(folder)


def stack_table(results: dict[str, dict[str, dict]]) -> str:
    head = ("| model | format | act dtype | kernels (layers) | prefill tok/s (vs fp32) | decode b1 tok/s (vs fp32) | "
            "decode b8 tok/s (vs fp32) | weights MiB: saved + kernel copies | RSS after load MiB | peak RSS MiB | "
            "load avg |")
    lines = [head, "|" + "---|" * 11]
    for model, rows in results.items():
        base = rows.get("fp32", {})
        order = list(FORMATS)
        for name, r in sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
            if "error" in r:
                lines.append(f"| {model} | {name} | | error: {r['error'].splitlines()[-1][:80]} |" + " |" * 7)
                continue

            def rel(key: str, r: dict = r, base: dict = base) -> str:
                return f"{r[key]:.1f} ({r[key] / base[key]:.2f}x)" if key in base else f"{r[key]:.1f}"
            kernels_used = ", ".join(f"{k} ({v})" for k, v in r["kernels"].items()) or "- (float)"
            mode = {"auto": "", "off": ", no kernels", "widen": ", widen"}[FORMATS[name][2]]
            lines.append(f"| {model} | {name.split(' (')[0]} | {FORMATS[name][1]}{mode}"
                         f" | {kernels_used} | {rel('prefill_tok_s')} | {rel('decode_b1_tok_s')} | "
                         f"{rel('decode_b8_tok_s')} | {r['stored_mib']:.0f} + {r['kernel_mib']:.0f} | "
                         f"{r['rss_after_load_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r.get('load_avg', '?')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", action="store_true", help="kernel vs reference on single layers")
    parser.add_argument("--tokens", type=int, nargs="*", default=list(MICRO_TOKENS))
    parser.add_argument("--dtypes", nargs="*", default=list(MICRO_DTYPES))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the synthetic stack")
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), help="subset of: " + ", ".join(FORMATS))
    parser.add_argument("--bundled", action="store_true", help="add rows for the bundled SmolLM2-135M")
    parser.add_argument("--model", default=None, help="add rows for this float checkpoint folder")
    parser.add_argument("--no-stack", action="store_true", help="skip the synthetic stack")
    parser.add_argument("--merge", action="store_true", help="keep the rows of an existing "
                        "bench/results/inference.json, replacing only the (model, format) rows measured now")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT" + json.dumps(measure(args.child[0], FORMATS[args.child[1]])))
        return
    if args.micro:
        rows = micro(tuple(args.tokens), tuple(args.dtypes), MICRO_FORMATS)
        write_results("inference_micro", {"env": environment(), "shapes": MICRO_SHAPES, "rows": rows},
                      micro_table(rows))
        return
    models = {}
    if args.bundled:
        from hfquant.bundled import bundled_model_path
        models["SmolLM2-135M"] = str(bundled_model_path())
    if args.model:
        models[Path(args.model).name] = args.model
    results: dict[str, dict[str, dict]] = {}
    previous = RESULTS / "inference.json"
    if args.merge and previous.exists():
        results = json.loads(previous.read_text())["results"]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_stack:
            stack = f"llama-stack {args.layers}x(2048, 5632)"
            models = {stack: synthetic_checkpoint(Path(tmp) / "stack", args.layers), **models}
        for model_name, path in models.items():
            results.setdefault(model_name, {})
            for name in args.formats:
                results[model_name][name] = run_child(path, name)
                print(model_name, name, json.dumps(results[model_name][name])[:300], flush=True)
    config = {"stack": {**STACK, "num_hidden_layers": args.layers}, "prefill_tokens": PREFILL_TOKENS,
              "decode_steps": DECODE_STEPS, "prompt_tokens": PROMPT_TOKENS}
    table = (f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. Prefill: one {PREFILL_TOKENS}-token "
             f"forward (best of up to 3). Decode: median single-token forward with a KV cache after a "
             f"{PROMPT_TOKENS}-token prompt. 'kernels' counts quantized layers per path chosen at load "
             "(reference = dequantize + F.linear); a kernel only runs up to its route's token limit "
             "(hfquant.nn.kernels.ROUTES), so prefill always takes the reference path. Weights: state_dict bytes "
             "(what is saved) + repacked kernel buffers. 'load avg': 1-minute load average when the row started; "
             f"with {os.cpu_count()} cores, above ~2 means other processes competed and decode numbers (many small "
             "multi-threaded ops) are unreliable.\n\n"
             + stack_table(results))
    write_results("inference", {"env": environment(), "config": config, "results": results}, table)


if __name__ == "__main__":
    main()
