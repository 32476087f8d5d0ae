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


def reference_correct_token_stats(model, base_model, input_ids, seqlen):
    """Δp, ln PPL ratio and top-1 SE computed token by token in plain Python."""
    gaps, delta_ps, agreements = [], [], []
    for start in range(0, len(input_ids) - seqlen + 1, seqlen):
        window = input_ids[None, start : start + seqlen]
        probs = F.softmax(model(window).logits[0].double(), dim=-1)
        base_probs = F.softmax(base_model(window).logits[0].double(), dim=-1)
        for position in range(seqlen):
            agreements.append(float(probs[position].argmax() == base_probs[position].argmax()))
            if position + 1 < seqlen:
                target = int(window[0, position + 1])
                p, q = probs[position, target].item(), base_probs[position, target].item()
                delta_ps.append(p - q)
                gaps.append(-torch.log(torch.tensor(p, dtype=torch.float64)).item()
                            + torch.log(torch.tensor(q, dtype=torch.float64)).item())
    rate = statistics.fmean(agreements)
    return {
        "mean_delta_p": statistics.fmean(delta_ps),
        "mean_delta_p_stderr": statistics.stdev(delta_ps) / len(delta_ps) ** 0.5,
        "ln_ppl_ratio": statistics.fmean(gaps),
        "ln_ppl_ratio_stderr": statistics.stdev(gaps) / len(gaps) ** 0.5,
        "top1_agreement_stderr": (rate * (1 - rate) / (len(agreements) - 1)) ** 0.5,
        "num_targets": len(gaps),
    }


@pytest.mark.parametrize("batch_size", [1, 2])
def test_correct_token_statistics_match_a_reference(base_model, perturbed_model, input_ids, batch_size):
    with torch.inference_mode():
        expected = reference_correct_token_stats(perturbed_model, base_model, input_ids, SEQLEN)
        result = drift(perturbed_model, base_model, input_ids, SEQLEN, batch_size=batch_size, progress=False)
    assert result.num_targets == expected["num_targets"] == 3 * (SEQLEN - 1)
    for key in ("mean_delta_p", "mean_delta_p_stderr", "ln_ppl_ratio", "ln_ppl_ratio_stderr", "top1_agreement_stderr"):
        assert getattr(result, key) == pytest.approx(expected[key], rel=1e-7, abs=1e-12), key
    assert result.ppl_ratio == pytest.approx(torch.tensor(expected["ln_ppl_ratio"]).exp().item(), rel=1e-7)
    assert result.ppl_ratio_stderr == pytest.approx(result.ppl_ratio * expected["ln_ppl_ratio_stderr"], rel=1e-7)


def test_ppl_ratio_is_the_ratio_of_window_perplexities(base_model, perturbed_model, input_ids):
    """exp(mean NLL gap) equals PPL(model)/PPL(base) computed from the models' own losses on the same targets."""
    from hfquant.evaluation import perplexity_gptq

    with torch.inference_mode():
        result = drift(perturbed_model, base_model, input_ids, SEQLEN, progress=False)
        ppl = perplexity_gptq(perturbed_model, input_ids, SEQLEN, progress=False).ppl
        base_ppl = perplexity_gptq(base_model, input_ids, SEQLEN, progress=False).ppl
    assert result.ppl_ratio == pytest.approx(ppl / base_ppl, rel=1e-4)


def test_no_drift_statistics_of_a_model_against_itself(base_model, input_ids):
    result = drift(base_model, base_model, input_ids, SEQLEN, progress=False)
    assert (result.mean_delta_p, result.ln_ppl_ratio, result.ppl_ratio) == (0.0, 0.0, 1.0)
    assert result.top1_agreement_stderr == 0.0
