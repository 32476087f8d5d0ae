"""Inference speed of hfquant formats on this machine, and where each kernel beats the reference path.

    python bench/inference.py            # synthetic Llama-shaped stack (hidden 2048, intermediate 5632)
    python bench/inference.py --micro    # one layer: kernel vs reference path by token count
    python bench/inference.py --bundled  # also rows for the bundled SmolLM2-135M (if it is available)
    python bench/inference.py --bundled --no-stack --compiled --threads 1 --formats fp32 "int8 (fp32 act)" ...

Stack mode builds a ``LlamaForCausalLM`` from a config with random weights, saves it once, and for
each format loads it in a fresh process (``from_pretrained(..., quantization_config=...)``, so the
quantizer's kernel preparation runs as it would for a user). It measures prefill tokens/s on a
512-token input, decode tokens/s at batch 1 and 8 (single-token forwards with a KV cache), and the
process's peak RSS. Ratios are against float32 in the same run. ``--compiled`` adds decode at batch 1
with ``torch.compile(model.forward, fullgraph=True)`` (inductor) and a static cache, float32
compiled the same way.

The limit: decoding one token at batch 1 reads every weight once (as the layer's decode path reads
it: the kernel's repacked copy, or the stored tensors for the reference path; one row of an
embedding unless it is tied to the output head) plus the KV cache at the timed context length.
Divided into this machine's memory bandwidth (a STREAM-like copy, measured at the start of the
run), that is an upper bound on decode tokens/s, written beside the measured tokens/s.

Writes ``bench/results/inference.{json,md,png}``; ``--micro`` writes
``bench/results/inference_micro.{json,md}``, the numbers behind :data:`hfquant.nn.kernels.ROUTES`.
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
# "exact" = HfQuantConfig(kernels="exact"), "off" = reference path only (kernels released),
# "widen" = 2/3-bit codes widened onto the int4 kernel)
FORMATS: dict[str, tuple[dict | None, str, str]] = {
    "fp32": (None, "float32", "auto"),
    "bf16": (None, "bfloat16", "auto"),
    "int8 (fp32 act)": ({"bits": 8, "group_size": -1}, "float32", "auto"),
    "int8 + int8 embeddings (fp32 act)": ({"bits": 8, "group_size": -1, "embeddings": "int8"}, "float32", "auto"),
    "int8 (fp32 act, exact)": ({"bits": 8, "group_size": -1}, "float32", "exact"),
    "int8 (fp32 act, no kernels)": ({"bits": 8, "group_size": -1}, "float32", "off"),
    "int8 (bf16 act)": ({"bits": 8, "group_size": -1}, "bfloat16", "auto"),
    "int8 (bf16 act, no kernels)": ({"bits": 8, "group_size": -1}, "bfloat16", "off"),
    "int4 g128 (fp32 act)": ({"bits": 4, "group_size": 128}, "float32", "auto"),
    "int4 g128 (fp32 act, exact)": ({"bits": 4, "group_size": 128}, "float32", "exact"),
    "int4 g128 + int8 embeddings (fp32 act)": ({"bits": 4, "group_size": 128, "embeddings": "int8"}, "float32", "auto"),
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
    in ``dtype``, and for float32 activations also in bfloat16 (the ``compute_dtype`` routes). A kernel
    reading the stored tensors (``dequant-mm-cpu``) is the reference path itself in ``dtype``, so it is
    timed in bfloat16 only, for float32 and float16 activations."""
    computes = [dtype] + ([torch.bfloat16] if dtype == torch.float32 else [])
    plans = {}
    for kernel in kernels.KERNELS.values():
        layouts = [kernel.layout(fmt, i, o) for i, o, _ in layers]
        if kernel.device_type != "cpu" or not kernel.takes(fmt, widen=True) or not all(layouts):
            continue
        if kernel.reads_stored:
            if dtype != torch.bfloat16:
                route = kernels.Route(kernel.name, "cpu", dtype, compute_dtype=torch.bfloat16)
                plans[f"{kernel.name} via bfloat16"] = [(kernels.Plan(kernel, route, lay), stored)
                                                        for lay, (_, _, stored) in zip(layouts, layers, strict=True)]
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
COMPILED_STEPS = 16  # single-token steps timed with the compiled forward
STREAM_MIB = 256  # each of the two arrays of the bandwidth copy: far larger than any cache here


def stream_copy_gb_s(mib: int = STREAM_MIB, repeats: int = 5) -> float:
    """Memory bandwidth of a STREAM "copy" (``b[:] = a``, float32): bytes read + written per second, in GB/s."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    seconds = best_ms(lambda: b.copy_(a), repeats=repeats, budget_s=10.0) / 1e3
    return 2 * a.numel() * a.element_size() / seconds / 1e9


def decode_bytes(model: torch.nn.Module, context: int) -> dict[str, int]:
    """Bytes one decoded token reads at batch 1: each weight once, as its decode path reads it, and the KV cache.

    A quantized layer counts the tensors its 1-token path reads (a kernel's repacked copy, else the
    stored tensors); an embedding counts one row unless its weight is also a linear layer's (a
    tied output head reads all of it); tensors shared between modules count once. KV cache: keys
    and values of every layer at ``context`` tokens, in the activation dtype.
    """
    from hfquant.nn.qlinear import QuantLinear

    seen: set[int] = set()
    weights = 0

    def read(tensors: list[torch.Tensor]) -> None:
        nonlocal weights
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                weights += t.numel() * t.element_size()

    embeddings = []
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embeddings.append(module)
        elif isinstance(module, QuantLinear):
            plan = module.kernel_plan
            tensors = module.kernel_tensors() if plan and not plan.kernel.reads_stored else module.stored()
            read([*tensors.values(), *([module.bias] if module.bias is not None else [])])
        else:
            read([*module.parameters(recurse=False), *module.buffers(recurse=False)])
    for embedding in (e for e in embeddings if e.weight.data_ptr() not in seen):
        weights += embedding.weight.shape[1] * embedding.weight.element_size()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    element = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * context * element
    return {"weights": weights, "kv_cache": kv}


def compiled_decode_tok_s(model: torch.nn.Module, vocab: int) -> dict[str, float]:
    """Decode tokens/s at batch 1 with ``torch.compile(model.forward, fullgraph=True)`` (inductor) and a static cache.

    The prompt runs eagerly; two compiled steps warm up (the first compiles), then the median of
    ``COMPILED_STEPS`` single-token steps is taken, as for eager decode.
    """
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=PROMPT_TOKENS + COMPILED_STEPS + 2)
    step = torch.compile(model.forward, fullgraph=True)
    ids = torch.randint(vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    out = model(ids, cache=cache, use_cache=True)
    token, step_s, compile_s = out.logits[:, -1:].argmax(-1), [], 0.0
    for i in range(COMPILED_STEPS + 2):
        t0 = time.perf_counter()
        out = step(token, cache=cache, use_cache=True, position_ids=torch.tensor([[PROMPT_TOKENS + i]]))
        token = out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - t0
        if i == 0:
            compile_s = elapsed
        elif i >= 2:
            step_s.append(elapsed)
    return {"compiled_decode_b1_tok_s": 1 / statistics.median(step_s), "compile_s": compile_s}


def measure(model_path: str, spec: tuple[dict | None, str, str], compiled: bool) -> dict:
    """Load ``model_path`` in ``spec``'s format and time prefill and decode (runs in a child process)."""
    from collections import Counter

    from _common import PeakMemory
    from transformers import AutoModelForCausalLM

    import hfquant
    from hfquant.nn.qlinear import QuantLinear, prepare_for_inference

    qconfig, dtype_name, kernel_mode = spec
    load_avg = round(os.getloadavg()[0], 1)  # > ~2 on this 2-core machine: other processes skew the numbers
    dtype = getattr(torch, dtype_name)
    if qconfig and kernel_mode == "exact":
        qconfig = {**qconfig, "kernels": "exact"}
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
        used = Counter(m.kernel_names() for m in layers)
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
            extra = compiled_decode_tok_s(model, vocab) if compiled else {}
    reads = decode_bytes(model, PROMPT_TOKENS + DECODE_STEPS[1] // 2)
    return {"load_avg": load_avg, "load_s": load_s, "kernels": dict(used), "stored_mib": stored_bytes / 2**20,
            "kernel_mib": kernel_bytes / 2**20, "rss_after_load_mib": rss_loaded, "peak_rss_mib": peak.peak_rss_mib(),
            "prefill_tok_s": PREFILL_TOKENS / (prefill_ms / 1e3),
            **{f"decode_b{b}_tok_s": v for b, v in decode.items()},
            "decode_read_bytes": reads, **extra, "load_avg_end": round(os.getloadavg()[0], 1)}


def run_child(model_path: str, name: str, compiled: bool, threads: int | None) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    argv = [sys.executable, __file__, "--child", model_path, name, *(["--compiled"] if compiled else [])]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        return {"error": proc.stderr[-1500:]}
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def synthetic_checkpoint(folder: Path, layers: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **STACK))
    model.save_pretrained(folder)
    return str(folder)


def _mode(name: str) -> str:
    return {"auto": "", "exact": ", exact", "off": ", no kernels", "widen": ", widen"}[FORMATS[name][2]]


def _ordered(rows: dict[str, dict]) -> list[tuple[str, dict]]:
    order = list(FORMATS)
    return sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def stack_table(results: dict[str, dict[str, dict]]) -> str:
    head = ("| model | format | act dtype | kernels (layers) | prefill tok/s (vs fp32) | decode b1 tok/s (vs fp32) | "
            "decode b8 tok/s (vs fp32) | compiled decode b1 tok/s (vs compiled fp32) | "
            "weights MiB: saved + kernel copies | RSS after load MiB | peak RSS MiB | load avg start/end |")
    lines = [head, "|" + "---|" * 12]
    for model, rows in results.items():
        base = rows.get("fp32", {})
        for name, r in _ordered(rows):
            if "error" in r:
                lines.append(f"| {model} | {name} | | error: {r['error'].splitlines()[-1][:80]} |" + " |" * 8)
                continue

            def rel(key: str, r: dict = r, base: dict = base) -> str:
                if key not in r:
                    return "-"
                return f"{r[key]:.1f} ({r[key] / base[key]:.2f}x)" if key in base else f"{r[key]:.1f}"
            kernels_used = ", ".join(f"{k} ({v})" for k, v in r["kernels"].items()) or "- (float)"
            lines.append(f"| {model} | {name.split(' (')[0]} | {FORMATS[name][1]}{_mode(name)}"
                         f" | {kernels_used} | {rel('prefill_tok_s')} | {rel('decode_b1_tok_s')} | "
                         f"{rel('decode_b8_tok_s')} | {rel('compiled_decode_b1_tok_s')} | "
                         f"{r['stored_mib']:.0f} + {r['kernel_mib']:.0f} | "
                         f"{r['rss_after_load_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                         f"{r.get('load_avg', '?')}/{r.get('load_avg_end', '?')} |")
    return "\n".join(lines)


def limit_rows(results: dict[str, dict[str, dict]], bandwidth_gb_s: float) -> list[dict]:
    """Per row: bytes read per decoded token, the bandwidth bound on tokens/s, the measured tokens/s."""
    rows = []
    for model, by_format in results.items():
        for name, r in _ordered(by_format):
            if "decode_read_bytes" not in r:
                continue
            total = r["decode_read_bytes"]["weights"] + r["decode_read_bytes"]["kv_cache"]
            rows.append({"model": model, "format": name, **r["decode_read_bytes"], "bytes_per_token": total,
                         "bound_tok_s": bandwidth_gb_s * 1e9 / total, "eager_tok_s": r["decode_b1_tok_s"],
                         "compiled_tok_s": r.get("compiled_decode_b1_tok_s")})
    return rows


def limit_table(rows: list[dict], bandwidth_gb_s: float) -> str:
    lines = ["| model | format | bytes read per token: weights MB + KV cache MB | bound tok/s | "
             "eager decode b1 tok/s (% of bound) | compiled decode b1 tok/s (% of bound) |", "|" + "---|" * 6]
    for r in rows:
        compiled = "-" if r["compiled_tok_s"] is None else (
            f"{r['compiled_tok_s']:.1f} ({100 * r['compiled_tok_s'] / r['bound_tok_s']:.0f}%)")
        eager = f"{r['eager_tok_s']:.1f} ({100 * r['eager_tok_s'] / r['bound_tok_s']:.0f}%)"
        lines.append(f"| {r['model']} | {r['format']} | {r['weights'] / 1e6:.1f} + {r['kv_cache'] / 1e6:.2f} | "
                     f"{r['bound_tok_s']:.0f} | {eager} | {compiled} |")
    return (f"Memory bandwidth (STREAM-like copy of {STREAM_MIB} MiB float32, read + written bytes, best of 5, "
            f"measured at the start of this run): **{bandwidth_gb_s:.1f} GB/s**. Bound = bandwidth / bytes read "
            "per decoded token at batch 1 (each weight once as its decode path reads it, one embedding row unless "
            f"tied to the head, KV cache at {PROMPT_TOKENS + DECODE_STEPS[1] // 2} tokens of context).\n\n"
            + "\n".join(lines))


def plot_limits(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    xs = range(len(rows))
    width = 0.27
    ax.bar([x - width for x in xs], [r["bound_tok_s"] for r in rows], width, label="bandwidth bound")
    ax.bar(list(xs), [r["eager_tok_s"] for r in rows], width, label="eager")
    ax.bar([x + width for x in xs], [r["compiled_tok_s"] or 0 for r in rows], width, label="compiled")
    ax.set_xticks(list(xs), [f"{r['model'][:12]}\n{r['format']}" for r in rows], fontsize=7, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", action="store_true", help="kernel vs reference on single layers")
    parser.add_argument("--tokens", type=int, nargs="*", default=list(MICRO_TOKENS))
    parser.add_argument("--micro-formats", nargs="*", default=list(MICRO_FORMATS),
                        help="subset of: " + ", ".join(MICRO_FORMATS))
    parser.add_argument("--out", default=None, help="results name (default inference, or inference_micro)")
    parser.add_argument("--dtypes", nargs="*", default=list(MICRO_DTYPES))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the synthetic stack")
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), help="subset of: " + ", ".join(FORMATS))
    parser.add_argument("--bundled", action="store_true", help="add rows for the bundled SmolLM2-135M")
    parser.add_argument("--model", default=None, help="add rows for this float checkpoint folder")
    parser.add_argument("--no-stack", action="store_true", help="skip the synthetic stack")
    parser.add_argument("--compiled", action="store_true", help="also time generate's compiled decoding step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of an existing "
                        "bench/results/inference.json, replacing only the (model, format) rows measured now")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT" + json.dumps(measure(args.child[0], FORMATS[args.child[1]], args.compiled)))
        return
    if args.micro:
        rows = micro(tuple(args.tokens), tuple(args.dtypes), {f: MICRO_FORMATS[f] for f in args.micro_formats})
        write_results(args.out or "inference_micro", {"env": environment(), "shapes": MICRO_SHAPES, "rows": rows},
                      micro_table(rows))
        return
    models = {}
    if args.bundled:
        from hfquant.bundled import bundled_model_path
        models["SmolLM2-135M"] = str(bundled_model_path())
    if args.model:
        models[Path(args.model).name] = args.model
    name = args.out or "inference"
    results: dict[str, dict[str, dict]] = {}
    previous = RESULTS / f"{name}.json"
    if args.merge and previous.exists():
        results = json.loads(previous.read_text())["results"]
    load_start = os.getloadavg()
    bandwidth = stream_copy_gb_s()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_stack:
            stack = f"llama-stack {args.layers}x(2048, 5632)"
            models = {stack: synthetic_checkpoint(Path(tmp) / "stack", args.layers), **models}
        for model_name, path in models.items():
            results.setdefault(model_name, {})
            for fmt_name in args.formats:
                results[model_name][fmt_name] = run_child(path, fmt_name, args.compiled, args.threads)
                print(model_name, fmt_name, json.dumps(results[model_name][fmt_name])[:300], flush=True)
    config = {"stack": {**STACK, "num_hidden_layers": args.layers}, "prefill_tokens": PREFILL_TOKENS,
              "decode_steps": DECODE_STEPS, "prompt_tokens": PROMPT_TOKENS, "compiled_steps": COMPILED_STEPS,
              "stream_mib": STREAM_MIB}
    limits = limit_rows(results, bandwidth)
    load_end = tuple(round(v, 2) for v in os.getloadavg())
    table = (f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; load average (1, 5, 15 min) at the "
             f"start {tuple(round(v, 2) for v in load_start)}, at the end {load_end}. "
             f"Prefill: one {PREFILL_TOKENS}-token forward (best of up to 3). Decode: median single-token forward "
             f"with a KV cache after a {PROMPT_TOKENS}-token prompt; compiled: median of {COMPILED_STEPS} "
             "steps of torch.compile(model.forward, fullgraph=True) (inductor) with a static cache. 'kernels' "
             "counts quantized layers per chain of routes chosen at load (by token range, `+`-joined; reference = "
             "dequantize + F.linear in the activation dtype outside every route's range; hfquant.nn.kernels.ROUTES). "
             "Bandwidth copy and decode run on the same number of threads. Weights: state_dict bytes "
             "(what is saved) + repacked kernel buffers. 'load avg': 1-minute load average when the row started and "
             f"ended; with {os.cpu_count()} cores, above ~2 means other processes competed, and only ratios within "
             "one run mean anything.\n\n" + stack_table(results) + "\n\n## The memory-bandwidth limit of decode\n\n"
             + limit_table(limits, bandwidth))
    write_results(name, {"env": environment(), "config": config, "bandwidth_gb_s": bandwidth,
                         "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "limits": limits,
                         "results": results}, table)
    if limits:
        plot_limits(limits, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
