"""Quantize the bundled SmolLM2-135M to int4 (round-to-nearest), generate, save, reload, compare logits.

    python examples/quantize_and_reload.py [MODEL]
"""

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant
from hfquant.bundled import bundled_model_path

path = sys.argv[1] if len(sys.argv) > 1 else str(bundled_model_path())
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(bits=4, group_size=128))

inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=12, do_sample=False)[0]))

with tempfile.TemporaryDirectory() as out:
    model.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        same = torch.equal(model(**inputs).logits, again(**inputs).logits)
    print(f"reloaded from {out}: logits bit-identical = {same}")
