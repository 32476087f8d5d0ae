"""hfquant reads weights only from safetensors: a pickle-based checkpoint is refused before it is opened."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfquant


class _Planted:
    """Unpickling this creates a file: the proof that a pickle was opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def _no_torch_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise AssertionError("torch.load was called on a user file")


def _pickled_copy(source: Path, target: Path) -> Path:
    """``source`` with its ``model.safetensors`` replaced by a ``pytorch_model.bin`` of the same tensors."""
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    (target / "model.safetensors").unlink()
    torch.save(state, target / "pytorch_model.bin")
    return target


def test_float_pickle_checkpoint_is_refused_before_it_is_read(tiny_checkpoints: dict, tmp_path: Path,
                                                               monkeypatch) -> None:
    folder = _pickled_copy(tiny_checkpoints["llama"], tmp_path / "bin")
    monkeypatch.setattr(torch, "load", _no_torch_load)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*not safetensors"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))


def test_quantized_checkpoint_as_pickle_is_refused(tiny_checkpoints: dict, tmp_path: Path, monkeypatch) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"],
                                                 quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path / "q")
    folder = _pickled_copy(tmp_path / "q", tmp_path / "q-bin")
    monkeypatch.setattr(torch, "load", _no_torch_load)
    with pytest.raises(ValueError, match="not safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_pickle_beside_the_safetensors_is_never_opened(tiny_checkpoints: dict, tmp_path: Path) -> None:
    folder = tmp_path / "both"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path / "q")
    AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert not marker.exists()
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # the plant works: the test above can fail
    assert marker.exists()
