"""Where per-tensor static int8 inputs lose: per-layer output error of static (each observer) vs dynamic.

On the float bundled model, the inputs of every linear layer of the decoder blocks are captured on
``--num-samples`` × ``--seqlen`` calibration tokens (Brown train) and on as many held-out tokens
(Brown test). Each observer's clip is chosen on the calibration inputs; the relative output error
``||Q(x) Wᵀ - x Wᵀ|| / ||x Wᵀ||`` (float weights: the activation error alone) is then measured on
the held-out inputs, for per-tensor static scales and for per-token dynamic ones. Also printed:
``max|x|`` over the 99.99th percentile of ``|x|``, a measure of how outlier-dominated the range is.

    PYTHONPATH=$PWD python bench/w8a8_static_profile.py [--num-samples 4] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant.activations import int8_scale_for_range, quantize_per_tensor_int8, quantize_per_token_int8
from hfquant.bundled import brown_corpus, bundled_model_path
from hfquant.calibration.data import calibration_batches
from hfquant.calibration.observers import OBSERVERS, AbsHistogram, add_to_histogram, percentile_clip
from hfquant.evaluation.perplexity import tokenize_corpus


def capture(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = [m.register_forward_hook(lambda _m, a, _o, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for row in ids:
            model(row[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return {n: torch.cat(x) for n, x in inputs.items()}


def relative_error(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    exact = x @ weight.T
    return float((((codes.float() * scale) @ weight.T) - exact).norm() / exact.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    calib = calibration_batches(tokenizer, None, num_samples=args.num_samples, seqlen=args.seqlen)
    test = tokenize_corpus(tokenizer, brown_corpus()["test"])[:args.num_samples * args.seqlen].reshape(
        args.num_samples, args.seqlen)
    seen, held_out = capture(model, calib), capture(model, test)
    by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, x in seen.items():
        hist = add_to_histogram(AbsHistogram(), x)
        weight = model.get_submodule(name).weight.float()
        kind = re.sub(r".*\.layers\.\d+\.", "", name)
        y = held_out[name]
        for observer in OBSERVERS.values():
            clip = observer.clip(hist, 99.99)
            codes, scale = quantize_per_tensor_int8(y, int8_scale_for_range(clip))
            by_kind[kind][f"static {observer.name}"].append(relative_error(codes, scale, y, weight))
        codes, scale = quantize_per_token_int8(y)
        by_kind[kind]["dynamic"].append(relative_error(codes, scale, y, weight))
        by_kind[kind]["max/p99.99"].append(hist.amax / percentile_clip(hist, 99.99))
    columns = ["dynamic", *(f"static {o}" for o in OBSERVERS), "max/p99.99"]
    lines = ["| layer | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for kind, values in by_kind.items():
        lines.append(f"| {kind} | " + " | ".join(f"{statistics.median(values[c]):.4f} (max {max(values[c]):.4f})"
                                                for c in columns) + " |")
    print(f"median (max) over the {len(seen) // len(by_kind)} blocks of the relative output error; "
          f"{args.num_samples}x{args.seqlen} tokens each for calibration and held-out")
    print("\n".join(lines))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(json.dumps({k: dict(v) for k, v in by_kind.items()}))


if __name__ == "__main__":
    main()
