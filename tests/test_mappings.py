"""Layer mappings per architecture and folding scales between feeders and the linears they feed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM

from hfquant.calibration.pipeline import find_blocks
from hfquant.mappings import ARCHITECTURES, architecture_for, block_mappings, fold
from tiny_models import BUILDERS, build

IDS = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))


def _mha_llama() -> torch.nn.Module:  # no grouped-query attention: v_proj -> o_proj applies
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, mlp_bias=True)).eval()


def _mistral() -> torch.nn.Module:
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4)).eval()


def _post_norm_opt() -> torch.nn.Module:  # OPT-350m style: the norms come after attention and MLP
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64, do_layer_norm_before=False)).eval()


MODELS = {**{arch: (lambda arch=arch: build(arch)) for arch in BUILDERS}, "llama-mha": _mha_llama,
          "mistral": _mistral, "opt-post-norm": _post_norm_opt}


def _randomise_norms(model: torch.nn.Module) -> None:
    """Norm weights of 1 would hide a fold that forgets them; give them (and biases) random values."""
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dim() == 1:
                weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0, 0.1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folding_random_scales_leaves_the_logits_unchanged(name: str) -> None:
    model = MODELS[name]()
    _randomise_norms(model)
    with torch.no_grad():
        reference = model(IDS).logits
    architecture = architecture_for(model.config, "smoothquant")
    gen = torch.Generator().manual_seed(1)
    folded = 0
    for block in find_blocks(model):
        for mapping in block_mappings(block, architecture, model.config):
            width = mapping.balance[0].weight.shape[0 if architecture.transposed else 1]
            fold(mapping, torch.empty(width).uniform_(0.2, 5.0, generator=gen), architecture.transposed)
            folded += 1
    with torch.no_grad():
        logits = model(IDS).logits
    assert folded > 0
    assert not torch.equal(logits, reference)  # the weights did change ...
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)  # ... the model did not


def test_which_mappings_apply() -> None:
    def applied(model: torch.nn.Module) -> list[str]:
        return [m.feeder_name for m in block_mappings(find_blocks(model)[0], architecture_for(model.config, "x"),
                                                      model.config)]

    assert applied(build("llama")) == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]  # GQA: no v -> o
    assert applied(_mha_llama()) == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
    assert applied(build("opt")) == ["self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"]
    assert applied(_post_norm_opt()) == ["self_attn.v_proj", "fc1"]  # the norms feed nothing
    assert applied(build("gpt2")) == ["ln_1", "ln_2"]  # GELU between c_fc and c_proj


def test_an_architecture_without_mappings_is_named() -> None:
    config = type("Config", (), {"model_type": "falcon"})()
    with pytest.raises(ValueError, match=r"smoothquant.*model_type='falcon'.*\['gpt2', 'llama', 'mistral', 'opt', "
                                         r"'qwen2'\]"):
        architecture_for(config, "smoothquant")
    assert sorted(ARCHITECTURES) == ["gpt2", "llama", "mistral", "opt", "qwen2"]


def test_fold_refuses_bad_scales() -> None:
    model = build("llama")
    mapping = block_mappings(find_blocks(model)[0], ARCHITECTURES["llama"], model.config)[0]
    for scales in (torch.zeros(64), torch.full((64,), float("inf")), torch.ones(2, 32)):
        with pytest.raises(ValueError, match="input_layernorm"):
            fold(mapping, scales, transposed=False)
