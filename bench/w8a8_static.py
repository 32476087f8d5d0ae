"""W8A8 static (``activations="int8-static"``, each observer) against W8A8 dynamic and fp32 on the bundled model.

One invocation, every row in the same process (each row's quality right after it is quantized,
then prefill timings of all rows interleaved round-robin so a busy machine affects them alike). Per row: ΔPPL and mean KL
(± standard error: per token, and over windows) against fp32 on ``--eval-tokens`` Brown test
tokens (GPTQ protocol windows of ``--seqlen``), prefill tokens/s of a ``--tokens`` prompt, and the
calibration time. Static rows calibrate on ``--num-samples`` × ``--calib-seqlen`` tokens of the
Brown train split, with the weights rounded to nearest (``--method rtn``, default) or by GPTQ.

    PYTHONPATH=$PWD python bench/w8a8_static.py [--eval-tokens 8192] [--num-samples 32] [--calib-seqlen 512]
"""

from __future__ import annotations

import argparse
import sys
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant
from hfquant.bundled import brown_corpus, bundled_model_path
from hfquant.evaluation.drift import drift
from hfquant.evaluation.perplexity import perplexity_gptq, tokenize_corpus

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_prefill_seconds  # noqa: E402

W8 = dict(format="int8", group_size=-1)
RESULTS = Path(__file__).parent / "results"


def rows(method: str) -> dict[str, tuple[str, dict | None]]:
    """``{key: (row name, config)}``; ``fp32`` is always run (the reference of every row)."""
    static = dict(W8, activations="int8-static", method=method)
    down_dynamic = {"re:.*mlp\\.down_proj": dict(W8, activations="int8-dynamic")}
    return {
        "fp32": ("fp32", None),
        "dynamic": ("W8A8 dynamic (int8-dynamic, rtn)", dict(W8, activations="int8-dynamic")),
        "minmax": (f"W8A8 static minmax ({method})", dict(static, observer="minmax")),
        "percentile": (f"W8A8 static percentile 99.99 ({method})",
                       dict(static, observer="percentile", observer_percentile=99.99)),
        "mse": (f"W8A8 static mse ({method})", dict(static, observer="mse")),
        "mse-down-dynamic": (f"W8A8 static mse, down_proj dynamic ({method})",
                             dict(static, observer="mse", rules=down_dynamic)),
        "mse-smoothquant": (f"W8A8 static mse + smoothquant=0.5 ({method})",
                            dict(static, observer="mse", smoothquant=0.5)),
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--method", default="rtn", help="weight method of the static rows (rtn or gptq)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="w8a8_static")
    parser.add_argument("--rows", nargs="+", default=["dynamic", "minmax", "percentile", "mse"],
                        choices=[k for k in rows("rtn") if k != "fp32"], help="rows besides fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = uptime()
    print(started, flush=True)
    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    test_ids = tokenize_corpus(tokenizer, brown_corpus()["test"])[:args.eval_tokens]
    models, results = {}, {}
    base_ppl = None
    table = rows(args.method)
    for name, cfg in (table[key] for key in ("fp32", *args.rows)):  # quality right after each row loads
        if cfg is not None and cfg.get("activations") == "int8-static":
            cfg = dict(cfg, num_samples=args.num_samples, seqlen=args.calib_seqlen)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=None if cfg is None else hfquant.HfQuantConfig(**cfg)).eval()
        row = {"load_s": time.perf_counter() - start}
        if base_ppl is None:
            base_ppl = perplexity_gptq(model, test_ids, args.seqlen, progress=False)
            row.update(ppl=base_ppl.ppl, ppl_ratio=1.0, eval_tokens=base_ppl.num_tokens)
        else:
            d = drift(model, models["fp32"], test_ids, args.seqlen, progress=False)
            row.update(ppl=base_ppl.ppl * d.ppl_ratio, ppl_ratio=d.ppl_ratio, ppl_ratio_stderr=d.ppl_ratio_stderr,
                       mean_kl=d.mean_kl, mean_kl_stderr=d.mean_kl_stderr,
                       mean_kl_stderr_windows=d.mean_kl_stderr_windows, top1=d.top1_agreement,
                       eval_tokens=d.num_tokens)
        models[name], results[name] = model, row
        print(name, json.dumps(row), uptime(), flush=True)
    prompt = test_ids[:args.tokens].unsqueeze(0)
    times = interleaved_prefill_seconds(models, prompt, args.repeats)
    for name, row in results.items():
        row.update(prefill_s=times[name], prefill_tok_s_median=args.tokens / statistics.median(times[name]),
                   prefill_tok_s_best=args.tokens / min(times[name]))
    ended = uptime()
    payload = {"args": vars(args), "uptime_start": started, "uptime_end": ended, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(payload, indent=2) + "\n")
    fp32 = results["fp32"]
    lines = ["| row | ΔPPL (± SE) | PPL | mean KL ± SE (tokens; windows) | top-1 | prefill tok/s median (best) "
             "| median vs fp32 (best vs best) | load+calibration s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        dppl = "—" if name == "fp32" else f"{100 * (r['ppl_ratio'] - 1):+.2f} % (± {100 * r['ppl_ratio_stderr']:.2f})"
        kl = "—" if name == "fp32" else (f"{r['mean_kl']:.4f} ± {r['mean_kl_stderr']:.4f}; "
                                         f"± {r['mean_kl_stderr_windows']:.4f}")
        top1 = "—" if name == "fp32" else f"{100 * r['top1']:.2f} %"
        lines.append(f"| {name} | {dppl} | {r['ppl']:.3f} | {kl} | {top1} | {r['prefill_tok_s_median']:.0f} "
                     f"({r['prefill_tok_s_best']:.0f}) | {r['prefill_tok_s_median'] / fp32['prefill_tok_s_median']:.2f}x "
                     f"({r['prefill_tok_s_best'] / fp32['prefill_tok_s_best']:.2f}x) | {r['load_s']:.0f} |")
    print("\n".join(lines))
    print("uptime at start:", started)
    print("uptime at end:  ", ended)
    assert all(math.isfinite(r["ppl"]) for r in results.values())


if __name__ == "__main__":
    main()
