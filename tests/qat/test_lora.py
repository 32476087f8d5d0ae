"""peft LoRA on packed hfquant models: adapters train with the Trainer, the packed weights stay frozen,
the saved adapter reloads exactly, and merging rounds into the layer's format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.nn.qlinear import QuantLinear
from tiny_models import build, train_with_trainer

peft = pytest.importorskip("peft")
hfquant_lora = pytest.importorskip("hfquant.lora")

IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 120, 77, 1, 2, 31, 9]])
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj"], "opt": ["q_proj", "fc2"],
           "gpt2": ["c_attn", "c_proj"]}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _packed(tmp_path: Path, arch: str, spec: str = "int4") -> Path:
    model = AutoModelForCausalLM.from_pretrained(_float(tmp_path, arch),
                                                 quantization_config=hfquant.HfQuantConfig(format=spec, group_size=32))
    model.save_pretrained(tmp_path / "packed")
    return tmp_path / "packed"


def _float(tmp_path: Path, arch: str) -> Path:
    build(arch).save_pretrained(tmp_path / "float")
    return tmp_path / "float"


def _packed_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor of every QuantLinear, by the layer's name without peft's ``.base_layer``."""
    return {f"{name.replace('.base_layer', '')}.{key}": tensor.detach().clone()
            for name, module in model.named_modules() if isinstance(module, QuantLinear)
            for key, tensor in module.stored().items()}


def _train(model: torch.nn.Module, out: Path, steps: int) -> list[float]:
    return train_with_trainer(model, str(out), steps, learning_rate=1e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_lora_trains_on_a_packed_model_and_its_adapter_reloads(tmp_path: Path, arch: str) -> None:
    packed = _packed(tmp_path, arch)
    base = AutoModelForCausalLM.from_pretrained(packed)
    stored = _packed_tensors(base)
    before = _logits(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_dropout=0.0)
    model = hfquant_lora.get_peft_model(base, config)
    wrapped = [m for m in model.modules() if isinstance(m, hfquant_lora.LoraQuantLinear)]
    assert wrapped and all(isinstance(m.get_base_layer(), QuantLinear) for m in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.equal(_logits(model), before)  # B starts at zero: the adapter adds nothing yet

    losses = _train(model, tmp_path / "run", steps=8)
    assert losses[-1] < losses[0]
    after = _packed_tensors(model.get_base_model())
    assert after.keys() == stored.keys()
    assert all(torch.equal(after[k], stored[k]) for k in stored)  # the packed weights never move
    model.eval()
    trained = _logits(model)
    assert not torch.allclose(trained, before)

    model.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in files and not any(n.endswith((".bin", ".pt")) for n in files)
    reloaded = hfquant_lora.load_adapter(AutoModelForCausalLM.from_pretrained(packed), str(tmp_path / "adapter"))
    assert torch.equal(_logits(reloaded), trained)


def test_plain_peft_without_registration_fails_and_register_is_idempotent(tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(_packed(tmp_path, "llama"))
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"]))
    config = peft.LoraConfig(target_modules=["q_proj"])
    assert hfquant_lora.register(hfquant_lora.register(config)) is config
    with pytest.raises(ValueError, match="config=dict"):
        hfquant_lora.register({"target_modules": ["q_proj"]})


def test_dora_is_refused_naming_the_option(tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(_packed(tmp_path, "llama"))
    with pytest.raises(ValueError, match="use_dora"):
        hfquant_lora.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"], use_dora=True))


def test_merge_rounds_into_the_format_and_the_merged_model_saves_and_reloads(tmp_path: Path) -> None:
    packed = _packed(tmp_path, "llama")
    model = hfquant_lora.get_peft_model(AutoModelForCausalLM.from_pretrained(packed),
                                        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                        init_lora_weights=False))  # random A and B: a real delta
    layer = next(m for m in model.modules() if isinstance(m, hfquant_lora.LoraQuantLinear))
    expected = torch.as_tensor(layer.get_base_layer().dequantized_weight()) + layer.get_delta_weight("default")
    adapted = _logits(model)
    with pytest.warns(UserWarning, match="rounds the merged weight"):
        merged = model.merge_and_unload()
    base = merged.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(base, QuantLinear)
    assert torch.equal(base.dequantized_weight(), base.fmt.decode(base.fmt.quantize(expected).stored(), base.in_features,
                                                                  torch.float32))
    rounded = _logits(merged)
    assert (rounded - adapted).abs().max() < 0.5 * (adapted.abs().max())  # rounding only, not a lost adapter
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), rounded)
