import copy
import statistics

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from hfquant.evaluation import drift
from tiny_models import sharp_llama as tiny_llama

SEQLEN = 16




@pytest.fixture(scope="module")
def base_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def perturbed_model(base_model) -> LlamaForCausalLM:
    model = copy.deepcopy(base_model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 97, (61,), generator=torch.Generator().manual_seed(1))


def reference_drift(model, base_model, input_ids, seqlen):
    kls, agreements = [], []
    for start in range(0, len(input_ids) - seqlen + 1, seqlen):
        window = input_ids[None, start : start + seqlen]
        log_probs = F.log_softmax(model(window).logits.double(), dim=-1)
        base_log_probs = F.log_softmax(base_model(window).logits.double(), dim=-1)
        kls.append(F.kl_div(log_probs, base_log_probs, log_target=True, reduction="none").sum(-1).flatten())
        agreements.append((log_probs.argmax(-1) == base_log_probs.argmax(-1)).flatten())
    kl = torch.cat(kls)
    window_means = [k.mean().item() for k in kls]
    return (
        kl.mean().item(),
        torch.quantile(kl, 0.99).item(),
        kl.max().item(),
        torch.cat(agreements).double().mean().item(),
        len(kl),
        statistics.stdev(kl.tolist()) / len(kl) ** 0.5,
        statistics.stdev(window_means) / len(window_means) ** 0.5,
    )


def test_model_against_itself_has_no_drift(base_model, input_ids):
    for other in (base_model, copy.deepcopy(base_model)):
        result = drift(other, base_model, input_ids, SEQLEN, progress=False)
        assert (result.mean_kl, result.p99_kl, result.max_kl) == (0.0, 0.0, 0.0)
        assert result.top1_agreement == 1.0
        assert result.num_tokens == 3 * SEQLEN


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perturbed_model_matches_kl_div_reference(base_model, perturbed_model, input_ids, batch_size):
    with torch.inference_mode():
        mean_kl, p99_kl, max_kl, top1, num_tokens, stderr, stderr_windows = reference_drift(
            perturbed_model, base_model, input_ids, SEQLEN)
    assert 0 < top1 < 1, "perturbation should flip some but not all top-1 tokens"
    result = drift(perturbed_model, base_model, input_ids, SEQLEN, batch_size=batch_size, progress=False)
    assert result.mean_kl == pytest.approx(mean_kl, rel=1e-10)
    assert result.p99_kl == pytest.approx(p99_kl, rel=1e-10)
    assert result.max_kl == pytest.approx(max_kl, rel=1e-10)
    assert result.top1_agreement == top1
    assert result.num_tokens == num_tokens
    assert result.mean_kl_stderr == pytest.approx(stderr, rel=1e-9)
    assert result.mean_kl_stderr_windows == pytest.approx(stderr_windows, rel=1e-9)
    assert result.num_windows == 3


def test_kl_direction_is_base_to_model(base_model, perturbed_model, input_ids):
    forward = drift(perturbed_model, base_model, input_ids, SEQLEN, progress=False)
    reverse = drift(base_model, perturbed_model, input_ids, SEQLEN, progress=False)
    assert forward.mean_kl != pytest.approx(reverse.mean_kl, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"seqlen": 0}, "seqlen"), ({"seqlen": 62}, "input_ids"), ({"seqlen": 8, "batch_size": 0}, "batch_size")],
)
def test_invalid_arguments_are_rejected(base_model, input_ids, kwargs, name):
    with pytest.raises(ValueError, match=name):
        drift(base_model, base_model, input_ids, progress=False, **kwargs)


def test_mismatched_models_are_rejected(base_model, input_ids):
    short_context = tiny_llama(max_position_embeddings=8)
    with pytest.raises(ValueError, match="seqlen.*max_position_embeddings"):
        drift(base_model, short_context, input_ids, SEQLEN, progress=False)
    with pytest.raises(ValueError, match="vocabularies"):
        drift(tiny_llama(vocab_size=101), base_model, input_ids, SEQLEN, progress=False)
