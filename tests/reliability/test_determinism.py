"""What determinism hfquant promises, checked on what a checkpoint holds.

* RTN (data-free): the checkpoint is a pure function of the float weights and the config. The same
  input gives the same tensors, header, ``config.json`` and model card in every process and at every
  CPU thread count: each weight is rounded on its own, no reduction order is involved.
* GPTQ (calibrated): with the same calibration data, ``seed``, torch build and CPU thread count, the
  checkpoint is the same from one run (process) to the next. Across thread counts it is not promised:
  Hessians and block forwards are float matmuls whose reduction order may depend on the number of
  threads, and a last-bit difference can flip a code.

"The same" is not "byte-identical file": ``model.safetensors`` holds two ``__metadata__`` entries
(``format`` from transformers, ``hfquant_plan`` from hfquant), and safetensors writes them in an
order that changes from process to process (safetensors/safetensors#584). So the tensor bytes and
the parsed header are compared; the model card is compared with its own folder path masked.
Each run is a fresh process, so hash randomisation and thread settings are those of a real user run.
"""


from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

CHILD = """
import sys
import torch
torch.set_num_threads(int(sys.argv[3]))
from transformers import AutoModelForCausalLM
import hfquant

source, out = sys.argv[1], sys.argv[2]
texts = [f"Sample {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(20)]
configs = {
    "rtn": hfquant.HfQuantConfig(format="int4", group_size=32, rules={"mlp.down_proj": "nf4"}),
    "gptq": hfquant.HfQuantConfig(format="int4", group_size=32, method="gptq", dataset=texts, num_samples=8,
                                  seqlen=32, seed=3, act_order=True),
}
for name, config in configs.items():
    AutoModelForCausalLM.from_pretrained(source, quantization_config=config).save_pretrained(f"{out}/{name}")
print(torch.get_num_threads())
"""


def _safetensors_content(path: Path) -> tuple[dict, str]:
    """``(header, sha256 of the tensor bytes)`` of a safetensors file: what it holds, whatever the order in
    which its ``__metadata__`` keys were written."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), hashlib.sha256(data[8 + size:]).hexdigest()


def _quantize(source: Path, out: Path, threads: int) -> dict[str, dict[str, Any]]:
    """RTN and GPTQ checkpoints of ``source`` written by a fresh process: ``{method: {file: content}}``."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out), str(threads)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == str(threads)
    return {method: {"model.safetensors": _safetensors_content(out / method / "model.safetensors"),
                     "config.json": (out / method / "config.json").read_bytes(),
                     "README.md": (out / method / "README.md").read_text().replace(str(out), "<out>")}
            for method in ("rtn", "gptq")}


@pytest.fixture(scope="module")
def runs(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Two runs with one thread, one with two, each in its own process."""
    root = tmp_path_factory.mktemp("determinism")
    return {label: _quantize(tiny_checkpoints["llama"], root / label, threads)
            for label, threads in (("1a", 1), ("1b", 1), ("2", 2))}


def test_rtn_checkpoint_is_identical_across_runs_and_thread_counts(runs: dict[str, dict]) -> None:
    assert runs["1a"]["rtn"] == runs["1b"]["rtn"] == runs["2"]["rtn"]


def test_gptq_checkpoint_is_identical_across_runs_at_one_thread_count(runs: dict[str, dict]) -> None:
    assert runs["1a"]["gptq"] == runs["1b"]["gptq"]


def test_the_comparison_sees_a_changed_tensor(tmp_path: Path) -> None:
    """The content compared above changes with one stored value, and not with the metadata's key order."""
    tensors = {"a": torch.zeros(4, dtype=torch.int32), "b": torch.ones(2)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt", "hfquant_plan": "{}"})
    save_file(dict(tensors, a=torch.tensor([0, 0, 0, 1], dtype=torch.int32)), tmp_path / "y.safetensors",
              metadata={"hfquant_plan": "{}", "format": "pt"})
    x, y = _safetensors_content(tmp_path / "x.safetensors"), _safetensors_content(tmp_path / "y.safetensors")
    assert x[0] == y[0] and x[1] != y[1]
