import math

import datasets
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from hfquant.evaluation import perplexity_gptq, perplexity_strided, tokenize_corpus
from tiny_models import sharp_llama as tiny_llama

NUM_TOKENS = 61




@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 97, (NUM_TOKENS,), generator=torch.Generator().manual_seed(1))


def reference_strided(model, input_ids, max_length, stride):
    """HF docs protocol, token by token: each token is scored once, by the first window that contains it,
    with that window's earlier tokens as context (the window's first token has none and is skipped)."""
    total_nll, count = 0.0, 0
    begin, scored_until = 0, 0
    while True:
        end = min(begin + max_length, len(input_ids))
        for position in range(max(scored_until, begin + 1), end):
            logits = model(input_ids[None, begin:position]).logits[0, -1]
            total_nll -= logits.log_softmax(-1)[input_ids[position]].item()
            count += 1
        scored_until = end
        if end == len(input_ids):
            return math.exp(total_nll / count), count
        begin += stride


def reference_gptq(model, input_ids, seqlen):
    """IST-DASLab/gptq llama.py ``llama_eval``."""
    testenc = input_ids[None]
    nsamples = testenc.numel() // seqlen
    nlls = []
    for i in range(nsamples):
        batch = testenc[:, i * seqlen : (i + 1) * seqlen]
        lm_logits = model(batch).logits
        shift_logits = lm_logits[:, :-1, :].contiguous()
        shift_labels = testenc[:, i * seqlen : (i + 1) * seqlen][:, 1:]
        loss = nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        nlls.append(loss * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item(), nsamples * (seqlen - 1)


@pytest.mark.parametrize(("max_length", "stride"), [(16, 16), (16, 5), (20, 7), (8, 3), (61, 61), (32, 10)])
def test_strided_matches_token_by_token_reference(model, input_ids, max_length, stride):
    with torch.inference_mode():
        expected_ppl, expected_tokens = reference_strided(model, input_ids, max_length, stride)
    result = perplexity_strided(model, input_ids, max_length, stride, progress=False)
    assert result.ppl == pytest.approx(expected_ppl, rel=1e-10)
    assert result.num_tokens == expected_tokens
    assert result.protocol == "strided"
    assert result.params == {"max_length": max_length, "stride": stride}


@pytest.mark.parametrize(("max_length", "stride"), [(16, 5), (16, 16), (8, 3)])
def test_strided_batch_size_does_not_change_result(model, input_ids, max_length, stride):
    """(16, 16) and (8, 3) end with a shorter window, which batch sizes 2 and 4 put after full ones."""
    single = perplexity_strided(model, input_ids, max_length, stride, batch_size=1, progress=False)
    for batch_size in (2, 3, 4):
        batched = perplexity_strided(model, input_ids, max_length, stride, batch_size=batch_size, progress=False)
        assert batched.ppl == pytest.approx(single.ppl, rel=1e-12)
        assert batched.num_tokens == single.num_tokens


def test_context_is_used(model, input_ids):
    """Guards the references: with little context the same tokens get a different perplexity."""
    full_context = perplexity_strided(model, input_ids, 16, 4, progress=False)
    short_context = perplexity_strided(model, input_ids, 4, 4, progress=False)
    assert full_context.ppl != pytest.approx(short_context.ppl, rel=1e-3)


@pytest.mark.parametrize("seqlen", [16, 20, 61])
def test_gptq_matches_reference(model, input_ids, seqlen):
    with torch.inference_mode():
        expected_ppl, expected_tokens = reference_gptq(model, input_ids, seqlen)
    for batch_size in (1, 2):
        result = perplexity_gptq(model, input_ids, seqlen, batch_size=batch_size, progress=False)
        assert result.ppl == pytest.approx(expected_ppl, rel=1e-10)
        assert result.nll == pytest.approx(math.log(expected_ppl), rel=1e-10)
        assert result.num_tokens == expected_tokens
        assert result.params == {"seqlen": seqlen}


def test_eval_mode_is_used_and_restored(input_ids):
    model = tiny_llama(attention_dropout=0.5)
    expected = perplexity_gptq(model, input_ids, 16, progress=False).ppl
    model.train()
    assert perplexity_gptq(model, input_ids, 16, progress=False).ppl == expected
    assert model.training


def test_tokenize_corpus_joins_texts_and_reads_dataset_column():
    class CharTokenizer:
        def __call__(self, text, return_tensors):
            assert return_tensors == "pt"
            return {"input_ids": torch.tensor([[ord(char) for char in text]])}

    expected = torch.tensor([ord(char) for char in "a\n\nbc"])
    assert torch.equal(tokenize_corpus(CharTokenizer(), ["a", "bc"]), expected)
    dataset = datasets.Dataset.from_dict({"body": ["a", "bc"]})
    assert torch.equal(tokenize_corpus(CharTokenizer(), dataset, text_column="body"), expected)
    assert torch.equal(tokenize_corpus(CharTokenizer(), ["a", "bc"], joiner=" "), torch.tensor([97, 32, 98, 99]))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_length": 0, "stride": 1}, "max_length"),
        ({"max_length": 8, "stride": 0}, "stride"),
        ({"max_length": 8, "stride": -2}, "stride"),
        ({"max_length": 8, "stride": 9}, "stride"),
        ({"max_length": 8, "stride": 4, "batch_size": 0}, "batch_size"),
        ({"max_length": NUM_TOKENS + 1, "stride": 4}, "input_ids"),
    ],
)
def test_strided_rejects_invalid_arguments(model, input_ids, kwargs, name):
    with pytest.raises(ValueError, match=name):
        perplexity_strided(model, input_ids, progress=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"seqlen": 0}, "seqlen"), ({"seqlen": 8, "batch_size": -1}, "batch_size")]
)
def test_gptq_rejects_invalid_arguments(model, input_ids, kwargs, name):
    with pytest.raises(ValueError, match=name):
        perplexity_gptq(model, input_ids, progress=False, **kwargs)


def test_windows_longer_than_the_model_context_are_rejected(model):
    long_input = torch.zeros(200, dtype=torch.long)
    with pytest.raises(ValueError, match="max_length.*max_position_embeddings"):
        perplexity_strided(model, long_input, 65, 8, progress=False)
    with pytest.raises(ValueError, match="seqlen.*max_position_embeddings"):
        perplexity_gptq(model, long_input, 65, progress=False)


def test_short_or_malformed_input_ids_are_rejected(model, input_ids):
    with pytest.raises(ValueError, match="input_ids.*seqlen"):
        perplexity_gptq(model, input_ids, NUM_TOKENS + 1, progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        perplexity_gptq(model, input_ids[None], 8, progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        perplexity_gptq(model, input_ids.float(), 8, progress=False)


def test_tokenize_corpus_rejects_empty_texts():
    with pytest.raises(ValueError, match="texts"):
        tokenize_corpus(lambda text, return_tensors: None, [])


@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen2"])
def test_other_architectures(arch, input_ids):
    from tiny_models import build

    model = build(arch)
    with torch.inference_mode():
        expected_ppl, _ = reference_gptq(model, input_ids, 16)
    result = perplexity_gptq(model, input_ids, 16, batch_size=2, progress=False)
    assert result.ppl == pytest.approx(expected_ppl, rel=1e-5)
