"""W8A8 dynamic (``activations="int8-dynamic"``) on the bundled model: prefill tok/s and perplexity.

One invocation, every row in the same process, timings interleaved round-robin so that a busy
machine affects the rows alike. Rows: fp32; W8A16 (``format="int8"``, weight-only); W8A8 dynamic
with the ``torch._int_mm`` route (its reference path gives the same logits bit for bit, tested).

    PYTHONPATH=$PWD python bench/w8a8_dynamic.py [--tokens 512] [--repeats 5] [--eval-tokens 4096]
"""

from __future__ import annotations

import argparse
import sys
import json
import os
import statistics
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant
from hfquant.bundled import brown_corpus, bundled_model_path
from hfquant.evaluation.perplexity import perplexity_gptq, tokenize_corpus

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_prefill_seconds  # noqa: E402

ROWS = {
    "fp32": None,
    "W8A16 (int8 weight-only)": dict(format="int8", group_size=-1),
    "W8A8 dynamic (int8-int-mm-cpu)": dict(format="int8", group_size=-1, activations="int8-dynamic"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    test_ids = tokenize_corpus(tokenizer, brown_corpus()["test"])[:args.eval_tokens]
    models = {name: AutoModelForCausalLM.from_pretrained(
        path, quantization_config=None if cfg is None else hfquant.HfQuantConfig(**cfg)).eval()
        for name, cfg in ROWS.items()}
    prompt = test_ids[:args.tokens].unsqueeze(0)
    times = interleaved_prefill_seconds(models, prompt, args.repeats)
    for name in models:
        print(name, "prefill tok/s", args.tokens / statistics.median(times[name]), times[name], flush=True)
    results = {}
    for name, model in models.items():
        ppl = perplexity_gptq(model, test_ids, args.seqlen, progress=False)
        median = statistics.median(times[name])
        results[name] = {"prefill_tok_s": args.tokens / median, "prefill_s": times[name], "ppl": ppl.ppl,
                         "eval_tokens": ppl.num_tokens}
        print(name, "ppl", ppl.ppl, flush=True)
    base = results["fp32"]
    print(f"load average {os.getloadavg()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"| row | prefill tok/s ({args.tokens} tokens, median of {args.repeats}) | vs fp32 | min-max s | PPL | ΔPPL |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x | "
              f"{min(r['prefill_s']):.3f}-{max(r['prefill_s']):.3f} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f} % |")
    print(json.dumps({"args": vars(args), "loadavg": os.getloadavg(), "results": results}))


if __name__ == "__main__":
    main()
