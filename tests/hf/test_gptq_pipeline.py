"""GPTQ inside from_pretrained, on the sequential calibration engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.calibration.pipeline import capture_block_inputs, find_blocks, layer_groups
from hfquant.nn.qlinear import QuantLinear
from tiny_models import build

TOKENS = torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(0))
EVAL = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(1))


def _gptq(**kwargs) -> hfquant.HfQuantConfig:
    return hfquant.HfQuantConfig(method="gptq", dataset=TOKENS, **{"bits": 3, "group_size": 32, **kwargs})


def _hidden_error(model: torch.nn.Module, base: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(ids, output_hidden_states=True).hidden_states[-1]
        ref = base(ids, output_hidden_states=True).hidden_states[-1]
    return float((out - ref).pow(2).mean())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_gptq_beats_rtn_and_reloads_exactly(arch: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])
    rtn = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch],
                                               quantization_config=hfquant.HfQuantConfig(bits=3, group_size=32))
    gptq = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=_gptq())
    assert sum(isinstance(m, QuantLinear) for m in gptq.modules()) == sum(isinstance(m, QuantLinear) for m in rtn.modules())
    assert _hidden_error(gptq, base, TOKENS) < _hidden_error(rtn, base, TOKENS)

    gptq.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "gptq" and saved["gptq"]["damp_percent"] == 0.01  # method options under its key
    assert saved["calibration"] == {"dataset": "tensor", "num_samples": 8, "seqlen": 48, "seed": 0}
    assert "dataset" not in saved and "tokenizer" not in saved
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # no calibration data needed
    with torch.no_grad():
        assert torch.equal(again(EVAL).logits, gptq(EVAL).logits)


def test_act_order_static_groups_reload_exactly(tiny_checkpoints: dict, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"],
                                                 quantization_config=_gptq(act_order=True, mse_clip=True))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = again.model.layers[0].self_attn.q_proj
    assert set(dict(layer.named_parameters())) == {"weight", "weight_scale", "weight_zero"}  # no permutation index
    with torch.no_grad():
        assert torch.equal(again(EVAL).logits, model(EVAL).logits)


def test_text_calibration_with_the_model_tokenizer(tiny_checkpoints: dict) -> None:
    texts = [f"Sample {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(20)]
    config = hfquant.HfQuantConfig(bits=4, group_size=32, method="gptq", dataset=texts, num_samples=4, seqlen=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["opt"], quantization_config=config)
    assert isinstance(model.model.decoder.layers[1].fc2, QuantLinear)
    assert model.config.quantization_config.calibration["dataset"] == "list[str] (20 texts)"


def test_true_sequential_groups() -> None:
    model = build("llama")
    blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], [TOKENS[:2]])
    targets = {n: m for n, m in model.named_modules() if n.startswith("model.layers.0.") and isinstance(m, torch.nn.Linear)}
    names = [[n.rsplit(".", 1)[1] for n in group] for group in layer_groups(blocks[0], targets, inputs[0])]
    assert names == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_offloaded_blocks_give_the_same_result(tiny_checkpoints: dict, tmp_path: Path) -> None:
    resident = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_gptq())
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_gptq(),
                                                     device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert isinstance(offloaded.model.layers[0].self_attn.q_proj, QuantLinear)
    assert [n for n, m in offloaded.named_modules() if isinstance(m, QuantLinear)] == \
        [n for n, m in resident.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        torch.testing.assert_close(offloaded(EVAL).logits, resident(EVAL).logits, rtol=0, atol=1e-5)


def test_seqlen_above_context_is_rejected(tiny_checkpoints: dict) -> None:
    config = hfquant.HfQuantConfig(method="gptq", seqlen=4096, dataset=["text"])
    with pytest.raises(ValueError, match="seqlen=4096"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cuda_quantize_and_reload(method: str, tiny_checkpoints: dict, tmp_path: Path) -> None:
    config = _gptq() if method == "gptq" else hfquant.HfQuantConfig(bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config,
                                                 device_map="cuda")
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    ids = EVAL.cuda()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    cpu = AutoModelForCausalLM.from_pretrained(tmp_path)  # a GPU-made checkpoint loads on CPU too
    with torch.no_grad():
        torch.testing.assert_close(cpu(EVAL).logits, logits.cpu(), rtol=1e-3, atol=1e-3)
