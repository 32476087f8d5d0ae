"""compressed-tensors export: loaded by plain transformers in a fresh process that never imports hfquant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant
from hfquant.hf.saving import save_quantized

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install compressed-tensors)")

LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert "hfquant" not in sys.modules, "the consumer imported hfquant"
ids = torch.arange(24)[None] % 100
torch.save(model(ids).logits.detach(), sys.argv[2])
"""


def _quantized(path: Path, **fields) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(kernels="off", **fields))


@pytest.mark.parametrize("fields", [
    {"format": "int4", "group_size": 32, "sym": True, "rules": {"mlp.down_proj": "int8"}},  # mixed: two groups
    {"format": "int8", "group_size": -1},
    {"format": "int2", "group_size": 16, "sym": True},
], ids=["int4-g32+int8", "int8-gc", "int2-g16"])
def test_plain_transformers_loads_the_export_with_equal_logits(fields, tiny_checkpoints, tmp_path: Path) -> None:
    model = _quantized(tiny_checkpoints["llama"], **fields)
    report = hfquant.export(model, tmp_path / "ct", to="compressed-tensors")
    assert report.counts() == {"exact": len(report.layers), "re-quantized": 0}
    saved = json.loads((tmp_path / "ct" / "hfquant-export.json").read_text())
    assert saved["counts"]["exact"] == 14 and saved["float_layers"] == ["lm_head"]
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "ct"), str(out)], check=True, capture_output=True,
                   cwd=tmp_path)
    ids = torch.arange(24)[None] % 100
    with torch.no_grad():
        expected = model(ids).logits
    # exact mappings: the same dequantized weights, so the same logits up to float32 matmul rounding
    torch.testing.assert_close(torch.load(out), expected, atol=1e-5, rtol=1e-5)


def test_export_from_a_saved_folder_copies_the_tokenizer(tiny_checkpoints, tmp_path: Path) -> None:
    model = _quantized(tiny_checkpoints["llama"], format="int4", group_size=32, sym=True)
    save_quantized(model, tmp_path / "q", tokenizer=AutoTokenizer.from_pretrained(tiny_checkpoints["llama"]))
    report = hfquant.export(tmp_path / "q", tmp_path / "ct", to="compressed-tensors")
    assert "tokenizer.json" in report.files and (tmp_path / "ct" / "tokenizer.json").is_file()
    hfquant.export(tmp_path / "q", tmp_path / "ct", to="compressed-tensors")  # its own export may be replaced


@pytest.mark.parametrize("fields, reason", [
    ({"format": "nf4"}, "not integers"),
    ({"format": "int4", "group_size": 32, "sym": False}, "asymmetric"),
    ({"format": "int3", "group_size": 32, "sym": True}, "3-bit"),
    ({"format": "int4", "group_size": 48, "sym": True}, "not a multiple of group_size"),
    ({"format": "int8", "group_size": -1, "activations": "int8-dynamic"}, "inputs are quantized too"),
])
def test_formats_it_cannot_hold_are_refused_naming_layer_and_format(fields, reason, tiny_checkpoints,
                                                                    tmp_path: Path) -> None:
    model = _quantized(tiny_checkpoints["llama"], **fields)
    name = model.model.layers[0].self_attn.q_proj.fmt.name
    with pytest.raises(ValueError, match=rf"layer model\.layers\.0\.self_attn\.q_proj: format {name}.*{reason}"):
        hfquant.export(model, tmp_path / "ct", to="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_bad_arguments_and_foreign_folders(tiny_checkpoints, tmp_path: Path) -> None:
    model = _quantized(tiny_checkpoints["llama"], format="int8")
    with pytest.raises(ValueError, match="to='tflite' is not allowed"):
        hfquant.export(model, tmp_path / "x", to="tflite")
    with pytest.raises(ValueError, match="not an hfquant checkpoint"):
        hfquant.export(tiny_checkpoints["llama"], tmp_path / "x")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to replace it"):
        hfquant.export(model, foreign)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_cli_export(tiny_checkpoints, tmp_path: Path) -> None:
    from hfquant.cli import main

    model = _quantized(tiny_checkpoints["llama"], format="int8")
    save_quantized(model, tmp_path / "q")
    main(["export", str(tmp_path / "q"), str(tmp_path / "ct"), "--to", "compressed-tensors"])
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tiny_checkpoints["llama"]), str(tmp_path / "ct2"), "--to", "compressed-tensors"])
    assert exit_info.value.code == 2
