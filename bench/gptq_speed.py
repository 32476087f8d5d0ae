"""Seconds GPTQ takes per layer at real model shapes, per device (the solve only, Hessian given).

    python bench/gptq_speed.py [--out DIR]

Writes ``gptq_speed.{json,md}`` (to bench/results by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, environment  # noqa: E402

from hfquant.algorithms.gptq import GPTQOptions, gptq_quantize, layer_reconstruction_error  # noqa: E402
from hfquant.formats import WeightFormat, make_format  # noqa: E402

SHAPES = {"SmolLM2 q_proj 576x576": (576, 576), "SmolLM2 down_proj 576x1536": (576, 1536),
          "Llama-7B q_proj 4096x4096": (4096, 4096), "Llama-7B down_proj 4096x11008": (4096, 11008)}


def measure(device: str, out_f: int, in_f: int, fmt: WeightFormat, options: GPTQOptions) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(out_f, in_f, generator=g) * 0.02).to(device)
    X = (torch.randn(4096, in_f, generator=g) @ (torch.eye(in_f) + 0.1 * torch.randn(in_f, in_f, generator=g))).to(device)
    H = 2 * X.T @ X / X.shape[0]
    gptq_quantize(W[:64], H, fmt, options)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    q = gptq_quantize(W, H, fmt, options)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ratio = layer_reconstruction_error(W, q.dequantize().to(device), H) / layer_reconstruction_error(
        W, fmt.quantize(W).dequantize().to(device), H)
    return {"seconds": seconds, "error_vs_rtn": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu-max-in", type=int, default=1536, help="skip larger shapes on CPU")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    fmt = make_format("int4", group_size=128, sym=False)
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        for device in devices:
            if device == "cpu" and in_f > args.cpu_max_in:
                continue
            for act_order in (False, True):
                r = measure(device, out_f, in_f, fmt, GPTQOptions(act_order=act_order))
                rows.append({"shape": name, "device": device, "act_order": act_order, **r})
                print(rows[-1], flush=True)
    lines = ["| layer | device | act_order | seconds | error vs RTN (H-weighted) |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['device']} | {r['act_order']} | {r['seconds']:.3f} | {r['error_vs_rtn']:.3f} |"
              for r in rows]
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "gptq_speed.json").write_text(json.dumps({"env": environment(), "format": fmt.name, "rows": rows}, indent=2))
    (out / "gptq_speed.md").write_text(f"GPTQ {fmt.name}, block_size 128\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
