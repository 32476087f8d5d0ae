"""What the CUDA fp8 kernel's W8A8 maths costs in quality, measured on the CPU.

    python bench/fp8_route.py [--max-tokens 16384] [--seqlen 2048]

``fp8-scaled-mm-cuda`` (``hfquant.nn.kernels``) rounds the activations to float8 e4m3 with a scale
per token, on top of the fp8 weights. torch's CPU ``_scaled_mm`` computes the same thing (slowly),
so the kernel's own ``pack``/``matmul`` run here on the bundled SmolLM2 with every linear layer in
``fp8`` (per channel), and the drift from the float32 model is measured for three ways of running
it, on the same tokens of the bundled Brown test split:

- ``weight-only``: the reference path (dequantize the fp8 weight, float32 matmul);
- ``W8A8 (float32 out)``: the fp8 kernel's maths, float32 activations in and out;
- ``W8A8 (bfloat16 model)``: the whole model in bfloat16, as the CUDA route runs it.

Writes ``bench/results/fp8_route.{json,md}``. Speed on a GPU is ``bench/gpu_check.py``'s job.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout's hfquant

from _common import environment, load_average, write_results  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hfquant  # noqa: E402
from hfquant.bundled import bundled_model_path  # noqa: E402
from hfquant.evaluation.drift import drift  # noqa: E402
from hfquant.nn import kernels  # noqa: E402
from hfquant.nn.qlinear import QuantLinear  # noqa: E402
from hfquant.workflows import EvalSettings, eval_tokens  # noqa: E402


def use_fp8_kernel_on_cpu(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Route every fp8 layer through the fp8 kernel's pack/matmul on the CPU; returns how many."""
    kernel = kernels.FP8_CUDA
    count = 0
    for layer in (m for m in model.modules() if isinstance(m, QuantLinear)):
        layout = kernel.layout(layer.fmt, layer.in_features, layer.out_features)
        if layout is None:
            continue
        layer.release_kernel()
        for name, tensor in kernel.pack(layer.stored(), layer.fmt, layout, dtype).items():
            layer.register_buffer(f"kernel_{name}", tensor, persistent=False)
        layer.kernel_plan = kernels.Plan(kernel, kernels.Route(kernel.name, "cpu", dtype), layout)
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    path = bundled_model_path()
    ids = eval_tokens(AutoTokenizer.from_pretrained(path), EvalSettings(max_tokens=args.max_tokens))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = hfquant.HfQuantConfig(format="fp8", kernels="off")
    rows = []
    for label, dtype, kernel in (("weight-only (reference path)", torch.float32, False),
                                 ("W8A8 (float32 out)", torch.float32, True),
                                 ("W8A8 (bfloat16 model)", torch.bfloat16, True)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config)
        routed = use_fp8_kernel_on_cpu(model, dtype) if kernel else 0
        load_before, start = load_average(), time.perf_counter()
        result = drift(model, base, ids, args.seqlen, progress=False)
        rows.append({"row": label, "dtype": str(dtype), "layers_on_fp8_kernel": routed, **vars(result),
                     "seconds": round(time.perf_counter() - start, 1), "load_average": [load_before, load_average()]})
        print(rows[-1], flush=True)
        del model
    table = "\n".join([
        f"fp8 (e4m3, per channel) on SmolLM2-135M, {rows[0]['num_tokens']} tokens of the Brown test split, "
        f"windows of {args.seqlen}; KL(fp32 || row).", "",
        "| row | layers on the fp8 kernel | mean KL ± SE (tokens) | ± SE (windows) | p99 KL | top-1 |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {r['row']} | {r['layers_on_fp8_kernel']} | {r['mean_kl']:.5f} ± {r['mean_kl_stderr']:.5f} | "
          f"{r['mean_kl_stderr_windows']:.5f} | {r['p99_kl']:.4f} | {r['top1_agreement']:.4f} |" for r in rows)])
    write_results("fp8_route", {"environment": environment(), "args": vars(args), "rows": rows}, table)


if __name__ == "__main__":
    main()
