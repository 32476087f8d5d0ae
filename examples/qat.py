"""Quantization-aware training of the bundled SmolLM2-135M, then the packed checkpoint.

    PYTHONPATH=. python examples/qat.py OUT [--format ternary] [--steps 50] [--distill]

Trains on the bundled Brown corpus's train split (random windows, Adam), converts the
fake-quantized model into QuantLinear layers (the PTQ checkpoint layout) and saves it; the
converted model computes exactly what the trained one did.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant
import hfquant.qat
from hfquant.calibration.data import load_text
from hfquant.evaluation.perplexity import perplexity_gptq, tokenize_corpus
from hfquant.qat import train
from hfquant.workflows import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--format", default="int3")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--distill", action="store_true")
    args = parser.parse_args()
    path = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = hfquant.HfQuantConfig(format=args.format, qat=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
    teacher = AutoModelForCausalLM.from_pretrained(path).eval() if args.distill else None
    ids = tokenize_corpus(tokenizer, load_text(None, split="train"))
    result = train.train(model, ids, steps=args.steps, batch_size=4, seqlen=256, lr=1e-5, teacher=teacher)
    print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {result.seconds:.0f} s")
    packed = hfquant.qat.convert(model)
    test = tokenize_corpus(tokenizer, load_text(None, split="test"))[:8192]
    with torch.no_grad():
        print("test perplexity:", perplexity_gptq(packed, test, seqlen=512).ppl)
    packed.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
