"""target_bits inside from_pretrained: a measured allocation, saved as an explicit plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.nn.qlinear import QuantLinear

TOKENS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
EVAL = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
CANDIDATES = ["int2-g32", "int4-g32", "int8"]


def _stored_bits(model: torch.nn.Module) -> tuple[int, int]:
    """(bits of every stored weight tensor, number of weights) over the QuantLinear layers, as loaded."""
    bits = weights = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            bits += sum(t.numel() * t.element_size() * 8 for t in module.stored().values())
            weights += module.in_features * module.out_features
    return bits, weights


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("target", [3.0, 4.0, 6.0])
def test_allocation_fits_the_budget_as_stored(arch: str, target: float, tiny_checkpoints: dict) -> None:
    config = hfquant.HfQuantConfig(target_bits=target, candidates=CANDIDATES, dataset=TOKENS)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=config)
    bits, weights = _stored_bits(model)
    assert bits <= target * weights
    plan = model.config.quantization_config.plan
    assert len(plan.counts()) >= 2  # a real mix: the budget lies between the candidates
    # the leftover is smaller than any single upgrade could use
    assert bits > (target - 1.0) * weights


def test_allocation_reloads_without_data(tiny_checkpoints: dict, tmp_path: Path) -> None:
    config = hfquant.HfQuantConfig(target_bits=3.5, candidates=CANDIDATES, method="gptq", dataset=TOKENS)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["target_bits"] == 3.5 and len(saved["candidates"]) == 3
    assert len(saved["plan"]["schemes"]) >= 2
    card = (tmp_path / "README.md").read_text()
    assert "| `model.layers.1` |" in card and "`self_attn.q_proj`" in card  # the per-layer table by depth
    assert (tmp_path / "bits_by_depth.png").stat().st_size > 1000
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # no dataset: the plan is explicit
    with torch.no_grad():
        assert torch.equal(again(EVAL).logits, model(EVAL).logits)


def test_more_sensitive_layers_get_more_bits(tiny_checkpoints: dict) -> None:
    """Layers whose inputs are scaled up (larger output error for the same rounding) are kept wider."""
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    with torch.no_grad():
        base.model.layers[1].post_attention_layernorm.weight.mul_(20.0)  # block 1's MLP inputs x20
    path = Path(tiny_checkpoints["llama"]).parent / "sharp_llama"
    base.save_pretrained(path)
    config = hfquant.HfQuantConfig(target_bits=3.0, candidates=["int2-g32", "int4-g32"], dataset=TOKENS)
    plan = AutoModelForCausalLM.from_pretrained(path, quantization_config=config).config.quantization_config.plan
    bits = {name: scheme.weight.code_bits for name, scheme in plan.layers.items()}
    mlp_1 = [bits[f"model.layers.1.mlp.{p}"] for p in ("gate_proj", "up_proj")]
    mlp_0 = [bits[f"model.layers.0.mlp.{p}"] for p in ("gate_proj", "up_proj")]
    assert min(mlp_1) >= max(mlp_0) and max(mlp_1) == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"target_bits": 0}, "target_bits=0(\\.0)? is not allowed"),
    ({"target_bits": 40}, "target_bits=40(\\.0)? is not allowed"),
    ({"target_bits": "3"}, "target_bits='3' is not allowed"),
    ({"candidates": ["int4"]}, "candidates=.* without target_bits"),
    ({"target_bits": 3, "candidates": []}, "candidates=\\[\\] is not allowed"),
    ({"target_bits": 3, "candidates": ["int5"]}, "candidates\\[0\\]"),
    ({"target_bits": 3, "candidates": ["int4", "int4-g128"]}, "more than once"),
    ({"target_bits": 3, "rules": {"lm_head": "int8"}}, "rules=.* with target_bits"),
])
def test_bad_budgets_and_candidates(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hfquant.HfQuantConfig(**kwargs)


@pytest.mark.parametrize("target", [1.5, 30.0])
def test_budget_outside_what_the_candidates_and_model_allow(target: float, tiny_checkpoints: dict) -> None:
    config = hfquant.HfQuantConfig(target_bits=target, candidates=CANDIDATES, dataset=TOKENS)
    model_path = tiny_checkpoints["llama"]
    if target > 16:  # a bfloat16 model: 30 bits/weight is above its float weights
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
        model_path = Path(model_path).parent / "bf16_llama"
        base.save_pretrained(model_path)
    with pytest.raises(ValueError, match=f"target_bits={target} is not allowed for this model"):
        AutoModelForCausalLM.from_pretrained(model_path, quantization_config=config)


@pytest.mark.integration
def test_cli_quantize_with_target_bits(tiny_checkpoints: dict, tmp_path: Path) -> None:
    from hfquant import cli

    out = tmp_path / "out"
    cli.main(["quantize", str(tiny_checkpoints["llama"]), str(out), "--target-bits", "3.5", "--candidates",
              "int2-g32", "int4-g32", "--num-samples", "4", "--calib-seqlen", "32"])
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["target_bits"] == 3.5 and set(saved["plan"]["schemes"]) == {"int2-g32-asym", "int4-g32-asym"}


def test_output_fisher_equals_autograd_of_the_loss() -> None:
    """The hook-based Fisher equals E[(dL/dy)^2] computed directly with torch.autograd.grad."""
    import torch.nn.functional as F

    from hfquant.sensitivity import output_fisher
    from tiny_models import build

    model = build("llama")
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    got = output_fisher(model, [TOKENS[:2]], {name: layer})[name]
    total = torch.zeros(layer.out_features, dtype=torch.float64)
    for ids in TOKENS[:2].split(1):
        captured = {}
        handle = layer.register_forward_hook(lambda _m, _a, out: captured.setdefault("y", out))
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        handle.remove()
        (grad,) = torch.autograd.grad(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"), captured["y"])
        total += grad.double().pow(2).reshape(-1, grad.shape[-1]).sum(0)
    torch.testing.assert_close(got, total / (2 * (TOKENS.shape[1] - 1)), rtol=1e-5, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # restored after the pass
