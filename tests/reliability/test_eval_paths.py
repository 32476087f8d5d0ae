"""`hfquant eval` of a saved quantized checkpoint, and `--base` pointing to one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfquant import workflows
from hfquant.cli import main
from hfquant.nn.qlinear import QuantLinear

TEXT = "\n\n".join(f"Paragraph {i}. The committee met on Tuesday and voted to adjourn." for i in range(40))
COMMON = ["--seqlen", "64", "--stride", "32", "--max-tokens", "256"]


@pytest.fixture()
def setup(tiny_checkpoints: dict, tmp_path: Path) -> tuple[Path, Path, Path]:
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    quantized = tmp_path / "q"
    main(["quantize", str(tiny_checkpoints["llama"]), str(quantized), "--bits", "4", "--group-size", "32"])
    return tiny_checkpoints["llama"], quantized, text


def test_load_keeps_the_saved_quantization_config(setup) -> None:
    _, quantized, _ = setup
    model, _ = workflows.load(str(quantized))
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    reference = AutoModelForCausalLM.from_pretrained(quantized)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_eval_of_a_saved_quantized_checkpoint(setup, tmp_path: Path) -> None:
    float_model, quantized, text = setup
    main(["eval", str(quantized), "--dataset", str(text), "--out", str(tmp_path / "q.json"), *COMMON])
    main(["eval", str(float_model), "--dataset", str(text), "--out", str(tmp_path / "f.json"), *COMMON])
    q, f = (json.loads((tmp_path / name).read_text()) for name in ("q.json", "f.json"))
    assert q["bits_per_weight"] < 8 < f["bits_per_weight"]
    assert q["perplexity"]["gptq"]["ppl"] != f["perplexity"]["gptq"]["ppl"]


def test_eval_with_a_quantized_base(setup, tmp_path: Path) -> None:
    float_model, quantized, text = setup
    main(["eval", str(float_model), "--base", str(quantized), "--dataset", str(text), "--out", str(tmp_path / "r.json"),
          *COMMON])
    drift = json.loads((tmp_path / "r.json").read_text())["drift"]
    assert drift["mean_kl"] > 0 and 0 < drift["top1_agreement"] <= 1


LOAD_WITHOUT_IMPORT = """
import sys
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1])
"""


def test_loading_without_import_hfquant_fails_loudly(setup, tmp_path: Path) -> None:
    """By design (stored weights never have nn.Linear's shape): an error, never silently wrong weights."""
    _, quantized, _ = setup
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_IMPORT, str(quantized)], check=False,
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "Unknown quantization type, got hfquant" in result.stderr
    assert "ignore_mismatched_sizes" in result.stderr.strip().splitlines()[-1]
