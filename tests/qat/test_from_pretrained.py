"""``from_pretrained(qat=True)``: trainable with the Trainer, resumable float checkpoint, packed after convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfquant
import hfquant.qat
from hfquant.nn.qlinear import QuantLinear
from hfquant.qat import FakeQuantLinear
from tiny_models import build, train_with_trainer

IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 120, 77, 1, 2, 31, 9]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def float_folder(tmp_path: Path) -> Path:
    build("llama").save_pretrained(tmp_path / "float")
    return tmp_path / "float"


def _train(model: torch.nn.Module, out: Path, steps: int) -> list[float]:
    return train_with_trainer(model, str(out), steps, learning_rate=3e-3)


@pytest.mark.parametrize("learn", [False, True])
def test_trainer_trains_a_qat_model_that_resumes_and_converts(float_folder: Path, tmp_path: Path, learn: bool) -> None:
    cfg = hfquant.HfQuantConfig(format="int3", group_size=32, qat=True, qat_learn_scales=learn, kernels="off")
    model = AutoModelForCausalLM.from_pretrained(float_folder, quantization_config=cfg)
    assert model.hf_quantizer.is_trainable
    layers = hfquant.qat.fake_layers(model)
    assert layers and all(layer.weight.requires_grad for layer in layers.values())
    start = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    losses = _train(model, tmp_path / "run1", steps=6)
    assert losses[-1] < losses[0]
    assert any(not torch.equal(layer.weight, start[name]) for name, layer in layers.items())

    model.eval()
    trained = _logits(model)
    model.save_pretrained(tmp_path / "resume")  # a float checkpoint with the QAT config
    saved = json.loads((tmp_path / "resume" / "config.json").read_text())["quantization_config"]
    assert saved["qat"] is True and saved["qat_learn_scales"] is learn
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resume")
    assert isinstance(resumed.get_submodule(next(iter(layers))), FakeQuantLinear)
    assert torch.equal(_logits(resumed.eval()), trained)
    more = _train(resumed, tmp_path / "run2", steps=3)
    assert more[-1] < losses[0]

    resumed.eval()
    continued = _logits(resumed)
    packed = hfquant.qat.convert(resumed)
    assert torch.equal(_logits(packed), continued)
    packed.save_pretrained(tmp_path / "packed")
    assert "qat" not in json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    hfquant.prepare_for_inference(reloaded, kernels="off")
    assert isinstance(reloaded.get_submodule(next(iter(layers))), QuantLinear)
    assert torch.equal(_logits(reloaded), continued)


def test_prepare_refuses_a_config_without_qat() -> None:
    with pytest.raises(ValueError, match="qat=True"):
        hfquant.qat.prepare(build("llama"), hfquant.HfQuantConfig(format="int4"))
