"""Export benchmark on the bundled SmolLM2-135M: per target and format, file size, exact vs re-quantized
layers, KL of each runtime's next-token distribution against hfquant's own model, prefill tokens/s of both.

    PYTHONPATH=$PWD python bench/export.py --tokens 512 --threads 1 \\
        --runs gguf:int4-g32-sym gguf:int8 compressed-tensors:int4-g64-sym [--llama-python VENV/bin/python]

Each runtime runs in a fresh process that never imports hfquant: transformers' own loaders
(compressed-tensors; GGUF, which dequantizes to float32) and, when ``--llama-python`` names a Python
with ``llama_cpp`` (llama-cpp-python, see bench/peer_envs.sh), llama.cpp itself on the GGUF file.
Prefill = one forward pass over all ``--tokens`` tokens, after a warm-up pass. Writes
bench/results/export.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

TRANSFORMERS_CONSUMER = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
folder, ids_path, out, threads, gguf_file = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {})).eval()
assert "hfquant" not in sys.modules
ids = torch.load(ids_path)
with torch.no_grad():
    model(ids[:, :8])  # compressed-tensors decompresses on the first forward
    start = time.perf_counter(); logits = model(ids).logits; seconds = time.perf_counter() - start
torch.save({"logits": logits, "seconds": seconds}, out)
"""

LLAMA_CPP_CONSUMER = """
import sys, time, numpy as np
import llama_cpp
from llama_cpp import Llama
path, ids_path, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = np.load(ids_path).tolist()
defaults = llama_cpp.llama_cpp.llama_model_default_params
def without_extra_buffers():  # llama.cpp's CPU extra buffer types (weight repacking, AMX) segfault here in decode
    params = defaults(); params.use_extra_bufts = False; return params
llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_buffers
llm = Llama(model_path=path, n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), logits_all=True,
            n_threads=threads, n_threads_batch=threads, verbose=False)
llm.eval(ids[:8]); llm.reset()
start = time.perf_counter(); llm.eval(ids); seconds = time.perf_counter() - start
np.savez(out, logits=np.asarray(llm.scores[:len(ids)], dtype=np.float32), seconds=seconds)
"""


def run_transformers(out: Path, runtime: Runtime, ids: torch.Tensor, scratch: Path, threads: int,
                     llama_python: str | None) -> tuple[torch.Tensor, float] | None:
    torch.save(ids, scratch / "ids.pt")
    gguf_file = runtime.file if runtime.target == "gguf" else ""
    subprocess.run([sys.executable, "-c", TRANSFORMERS_CONSUMER, str(out), str(scratch / "ids.pt"),
                    str(scratch / "res.pt"), str(threads), gguf_file], check=True, capture_output=True)
    result = torch.load(scratch / "res.pt")
    return result["logits"], result["seconds"]


def run_llama_cpp(out: Path, runtime: Runtime, ids: torch.Tensor, scratch: Path, threads: int,
                  llama_python: str | None) -> tuple[torch.Tensor, float] | None:
    if llama_python is None:
        return None
    import numpy as np

    np.save(scratch / "ids.npy", ids[0].numpy())
    subprocess.run([llama_python, "-c", LLAMA_CPP_CONSUMER, str(out / runtime.file), str(scratch / "ids.npy"),
                    str(scratch / "res.npz"), str(threads)], check=True, capture_output=True)
    result = np.load(scratch / "res.npz")
    return torch.from_numpy(result["logits"])[None], float(result["seconds"])


@dataclass(frozen=True)
class Runtime:
    """A consumer of an export: the target it reads, the file whose size is reported, how it runs."""

    name: str
    target: str
    file: str
    run: Callable[..., tuple[torch.Tensor, float] | None]  # (folder, runtime, ids, scratch, threads, llama_python)


RUNTIMES = (
    Runtime("transformers (compressed-tensors)", "compressed-tensors", "model.safetensors", run_transformers),
    Runtime("transformers (GGUF loader, dequantized)", "gguf", "model.gguf", run_transformers),
    Runtime("llama.cpp", "gguf", "model.gguf", run_llama_cpp),
)


def kl_rows(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    log_p, log_q = ours.log_softmax(-1).double(), theirs.log_softmax(-1).double()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "max_logit_diff": (ours - theirs).abs().max().item(),
            "top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).double().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch / llama.cpp threads in every process")
    parser.add_argument("--runs", nargs="+", default=["gguf:int4-g32-sym", "gguf:int4-g32-asym", "gguf:int8",
                                                      "gguf:nf4", "compressed-tensors:int4-g64-sym",
                                                      "compressed-tensors:int8"])
    venv_python = Path(os.environ.get("HFQUANT_PEER_VENVS", "/work/venvs")) / "llamacpp" / "bin" / "python"
    parser.add_argument("--llama-python", default=str(venv_python) if venv_python.exists() else None,
                        help="a Python with llama_cpp installed (default: $HFQUANT_PEER_VENVS/llamacpp if present)")
    parser.add_argument("--out", default="bench/results/export")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import hfquant
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfquant.bundled import corpus
    from hfquant.bundled.model import bundled_model_path
    from hfquant.formats import parse_spec

    path = bundled_model_path()
    text = "\n\n".join(corpus.brown_corpus()["test"]["text"][:200])
    ids = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt").input_ids[:, :args.tokens]
    rows = []
    for run in args.runs:
        target, spec = run.split(":", 1)
        config = hfquant.HfQuantConfig(**parse_spec(spec).to_dict(), kernels="exact")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()
        with torch.no_grad():
            model(ids[:, :8])
            start = time.perf_counter()
            ours = model(ids).logits
            ours_seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory(prefix="export_bench_") as scratch:
            out = Path(scratch) / "export"
            start = time.perf_counter()
            report = hfquant.export(model, out, to=target)
            export_seconds = time.perf_counter() - start
            types = sorted({layer.target_type for layer in report.layers})
            for runtime in (r for r in RUNTIMES if r.target == target):
                result = runtime.run(out, runtime, ids, Path(scratch), args.threads, args.llama_python)
                if result is None:
                    print(f"{runtime.name}: skipped (no --llama-python with llama_cpp)")
                    continue
                logits, seconds = result
                rows.append({"target": target, "runtime": runtime.name, "spec": spec, "types": types,
                             "file_bytes": (out / runtime.file).stat().st_size, **report.counts(),
                             "worst_weight_error": max(layer.max_abs_error for layer in report.layers),
                             **kl_rows(ours, logits), "export_seconds": export_seconds,
                             "prefill_tokens_per_s_target": ids.shape[1] / seconds,
                             "prefill_tokens_per_s_hfquant": ids.shape[1] / ours_seconds, "tokens": ids.shape[1],
                             "threads": args.threads})
                print(rows[-1], flush=True)
        del model
    if args.llama_python:  # llama.cpp on its own converter's file (the bundled Q4_1 GGUF) vs that file dequantized
        from hfquant.bundled.model import bundled_gguf_path

        float_model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            ours = float_model(ids).logits
        with tempfile.TemporaryDirectory(prefix="export_bench_") as scratch:
            source = bundled_gguf_path()
            runtime = Runtime("llama.cpp", "gguf", source.name, run_llama_cpp)
            logits, seconds = run_llama_cpp(source.parent, runtime, ids, Path(scratch), args.threads, args.llama_python)
        rows.append({"target": "(reference) llama.cpp's own GGUF", "runtime": "llama.cpp", "spec": "bundled Q4_1 file",
                     "types": ["Q4_1", "Q8_0 (embedding)"], "file_bytes": source.stat().st_size, "exact": 0,
                     "re-quantized": 0, "worst_weight_error": 0.0, **kl_rows(ours, logits), "export_seconds": 0.0,
                     "prefill_tokens_per_s_target": ids.shape[1] / seconds, "prefill_tokens_per_s_hfquant": float("nan"),
                     "tokens": ids.shape[1], "threads": args.threads})
        print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    header = ("| target | runtime | spec | GGUF/CT type | file MB | exact | re-quantized | worst weight error | "
              "KL mean | KL max | top-1 agree | prefill tok/s runtime | prefill tok/s hfquant |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = "".join(
        f"| {r['target']} | {r['runtime']} | {r['spec']} | {', '.join(r['types'])} | {r['file_bytes'] / 1e6:.1f} | "
        f"{r['exact']} | {r['re-quantized']} | {r['worst_weight_error']:.2g} | {r['kl_mean']:.2e} | "
        f"{r['kl_max']:.2e} | {r['top1_agreement']:.3f} | {r['prefill_tokens_per_s_target']:.0f} | "
        f"{r['prefill_tokens_per_s_hfquant']:.0f} |\n" for r in rows)
    Path(args.out + ".md").write_text(header + lines)
    print(header + lines)


if __name__ == "__main__":
    main()
