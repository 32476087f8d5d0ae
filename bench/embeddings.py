"""Quality and decode speed of quantized token embeddings / output head on the bundled SmolLM2-135M.

    python bench/embeddings.py [--tokens 4096] [--seqlen 1024] [--decode-tokens 32] [--threads 1]

Every row is RTN, scored by :func:`hfquant.evaluation.drift` (KL(fp32 || row) per token, top-1
agreement, perplexity ratio) on the same tokens of the bundled corpus's test split, in one
process. Rows "… only" keep every decoder layer in float32 (``rules={"re:model\\.layers\\..*": None}``),
so their drift is the embedding's (tied: also the head's) alone. Decode: greedy ``generate`` at
batch 1 from a 16-token prompt, median of 3 timed runs after one warm-up, same process and
threads for every row. Writes ``bench/results/embeddings.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import environment, load_average, write_results  # noqa: E402

BODY_FLOAT = {"rules": {"re:model\\.layers\\..*": None}}
ROWS = {
    "int4 g128": dict(bits=4, group_size=128),
    "int4 g128 + int8 embeddings": dict(bits=4, group_size=128, embeddings="int8"),
    "int4 g128 + int8-g128 embeddings": dict(bits=4, group_size=128, embeddings="int8-g128"),
    "int8 embeddings only": dict(bits=4, embeddings="int8", **BODY_FLOAT),
    "int8": dict(bits=8),
    "int8 + int8 embeddings": dict(bits=8, embeddings="int8"),
}
DECODE_ROWS = ("int4 g128", "int4 g128 + int8 embeddings", "int8", "int8 + int8 embeddings")


def decode_seconds_per_token(model, prompt, new_tokens: int) -> float:  # noqa: ANN001
    import torch

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return (time.perf_counter() - start) / new_tokens

    run()
    return statistics.median(run() for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfquant
    from hfquant import workflows
    from hfquant.bundled import bundled_model_path
    from hfquant.evaluation import drift
    from hfquant.stats import storage_stats

    torch.set_num_threads(args.threads)
    path = str(bundled_model_path())
    ids = workflows.eval_tokens(AutoTokenizer.from_pretrained(path), workflows.EvalSettings(max_tokens=args.tokens))
    prompt = ids[None, :16]
    base = AutoModelForCausalLM.from_pretrained(path)
    rows = {"fp32": {"decode_s_per_token": decode_seconds_per_token(base, prompt, args.decode_tokens)}}
    load_before = load_average()
    for name, kwargs in ROWS.items():
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(**kwargs))
        stats = storage_stats(model)
        result = drift(model, base, ids, seqlen=args.seqlen, progress=False)
        rows[name] = {"config": kwargs, "drift": dataclasses.asdict(result),
                      "total_bytes": stats.total_bytes}
        if name in DECODE_ROWS:
            rows[name]["decode_s_per_token"] = decode_seconds_per_token(model, prompt, args.decode_tokens)
        print(name, rows[name]["drift"]["mean_kl"], rows[name].get("decode_s_per_token"), file=sys.stderr)
        del model
    fp32_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    fp32_decode = rows["fp32"]["decode_s_per_token"]
    lines = ["| row | mean KL ± s.e. | top-1 agreement | PPL ratio | bytes vs fp32 | decode tok/s | vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if name == "fp32":
            lines.append(f"| fp32 | 0 | 1 | 1 | 1.000 | {1 / fp32_decode:.1f} | 1.00 |")
            continue
        d = row["drift"]
        speed = row.get("decode_s_per_token")
        decode = f"{1 / speed:.1f} | {fp32_decode / speed:.2f}" if speed else "– | –"
        lines.append(f"| {name} | {d['mean_kl']:.4f} ± {d['mean_kl_stderr']:.4f} | {d['top1_agreement']:.4f} | "
                     f"{d['ppl_ratio']:.4f} | {row['total_bytes'] / fp32_bytes:.3f} | {decode} |")
    load_after = load_average()
    table = (f"Model: bundled SmolLM2-135M, {len(ids)} tokens in windows of {args.seqlen}, RTN, "
             f"{args.threads} thread(s); load average before/after: {load_before} / {load_after}\n\n"
             + "\n".join(lines))
    write_results("embeddings", {"env": environment(), "args": vars(args), "load_average": [load_before, load_after],
                                 "rows": rows}, table)


if __name__ == "__main__":
    main()
