"""Export benchmark on the bundled SmolLM2-135M: per target and format, file size, exact vs re-quantized
layers, KL of the target runtime's next-token distribution against hfquant's own model, tokens/s of both.

    PYTHONPATH=$PWD python bench/export.py --tokens 512 --specs int4-g64-sym int8

The target side runs in a fresh process that never imports hfquant. Writes bench/results/export.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONSUMER = """
import sys, time, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert "hfquant" not in sys.modules
ids = torch.load(sys.argv[2])
with torch.no_grad():
    model(ids[:, :8])  # compressed-tensors decompresses on the first forward
    start = time.perf_counter(); logits = model(ids).logits; seconds = time.perf_counter() - start
torch.save({"logits": logits, "seconds": seconds}, sys.argv[3])
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--specs", nargs="+", default=["int4-g64-sym", "int8"])
    parser.add_argument("--out", default="bench/results/export")
    args = parser.parse_args()
    import hfquant
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfquant.bundled import corpus
    from hfquant.bundled.model import bundled_model_path
    from hfquant.formats import parse_spec

    path = bundled_model_path()
    text = "\n\n".join(corpus.brown_corpus()["test"]["text"][:200])
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.tokens]
    rows = []
    for spec in args.specs:
        fmt = parse_spec(spec)
        config = hfquant.HfQuantConfig(**fmt.to_dict(), kernels="exact")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()
        with tempfile.TemporaryDirectory(prefix="export_bench_") as scratch:
            out = Path(scratch) / "ct"
            report = hfquant.export(model, out, to="compressed-tensors")
            torch.save(ids, Path(scratch) / "ids.pt")
            with torch.no_grad():
                model(ids[:, :8])
                start = time.perf_counter()
                ours = model(ids).logits
                ours_seconds = time.perf_counter() - start
            subprocess.run([sys.executable, "-c", CONSUMER, str(out), str(Path(scratch) / "ids.pt"),
                            str(Path(scratch) / "res.pt")], check=True, capture_output=True)
            theirs = torch.load(Path(scratch) / "res.pt")
            size = (out / "model.safetensors").stat().st_size
        log_p, log_q = ours.log_softmax(-1).double(), theirs["logits"].log_softmax(-1).double()
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        rows.append({"target": "compressed-tensors", "spec": spec, "file_bytes": size, **report.counts(),
                     "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
                     "max_logit_diff": (ours - theirs["logits"]).abs().max().item(),
                     "prefill_tokens_per_s_target": ids.shape[1] / theirs["seconds"],
                     "prefill_tokens_per_s_hfquant": ids.shape[1] / ours_seconds, "tokens": ids.shape[1]})
        print(rows[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    header = "| target | spec | file MB | exact | re-quantized | KL mean | KL max | max logit diff | prefill tok/s target | prefill tok/s hfquant |\n|---|---|---|---|---|---|---|---|---|---|\n"
    lines = "".join(f"| {r['target']} | {r['spec']} | {r['file_bytes'] / 1e6:.1f} | {r['exact']} | {r['re-quantized']} | "
                    f"{r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['max_logit_diff']:.2e} | "
                    f"{r['prefill_tokens_per_s_target']:.0f} | {r['prefill_tokens_per_s_hfquant']:.0f} |\n" for r in rows)
    Path(args.out + ".md").write_text(header + lines)
    print(header + lines)


if __name__ == "__main__":
    main()
