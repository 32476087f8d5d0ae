"""Tests for hfquant.evaluation.embeddings: pooling, normalisation and drift against plain reference code."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForMaskedLM, BertModel, PreTrainedTokenizerFast

from hfquant.evaluation import embeddings

SENTENCES = ["The cat sat on the mat.", "A dog!", "Stocks fell sharply in early trading today.", "Hi",
             "Quantization keeps the meaning of a sentence.", "Rain."]


def tiny_bert_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """Character-level tokenizer (printable ASCII) with [PAD] = 0, like tests/tiny_models.tiny_tokenizer."""
    chars = ["[PAD]", "[UNK]", *dict.fromkeys(string.printable)]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]" if pad else None,
                                   model_max_length=128)


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    return BertModel(config, add_pooling_layer=False).eval()


def perturbed(model: BertModel, scale: float, seed: int = 1) -> BertModel:
    """A copy of ``model`` with Gaussian noise (``scale`` x each weight's std) added to every linear weight."""
    copy = tiny_bert()
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in copy.modules():
            if isinstance(module, torch.nn.Linear):
                noise = torch.randn(module.weight.shape, generator=generator)
                module.weight += scale * module.weight.std() * noise
    return copy


def reference_embedding(model: BertModel, tokenizer, sentence: str, max_length: int = 128) -> torch.Tensor:
    """One sentence alone (no padding): mean of every token's last hidden state, divided by its norm."""
    ids = tokenizer(sentence, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state[0]
    mean = hidden.sum(0) / hidden.shape[0]
    return mean / mean.norm()


def reference_drift(ours: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """Straightforward numpy version of the EmbeddingDrift fields (inputs already unit rows, no ties)."""
    cosines = np.array([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(ours, base)])
    n = len(ours)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    unit, unit_base = ours / np.linalg.norm(ours, axis=1, keepdims=True), base / np.linalg.norm(base, axis=1,
                                                                                            keepdims=True)
    sims = np.array([unit[i] @ unit[j] for i, j in pairs])
    base_sims = np.array([unit_base[i] @ unit_base[j] for i, j in pairs])
    ranks = np.argsort(np.argsort(sims)).astype(float)
    base_ranks = np.argsort(np.argsort(base_sims)).astype(float)
    return {
        "mean_cosine": cosines.mean(),
        "min_cosine": cosines.min(),
        "p01_cosine": np.percentile(cosines, 1),
        "similarity_pearson": np.corrcoef(sims, base_sims)[0, 1],
        "similarity_spearman": np.corrcoef(ranks, base_ranks)[0, 1],
        "similarity_mean_abs_diff": np.abs(sims - base_sims).mean(),
        "num_sentences": n,
    }


@pytest.fixture(scope="module")
def model() -> BertModel:
    return tiny_bert()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_bert_tokenizer()


def test_mean_pool_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(embeddings.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))
    assert embeddings.mean_pool(hidden.double(), mask).dtype == torch.float32


@pytest.mark.parametrize("batch_size", [1, 2, 4, 32])
def test_sentence_embeddings_equal_unpadded_reference(model, tokenizer, batch_size) -> None:
    """Padded batches give what each sentence gives alone: the mask keeps pad tokens out of the mean."""
    got = embeddings.sentence_embeddings(model, tokenizer, SENTENCES, batch_size=batch_size)
    expected = torch.stack([reference_embedding(model, tokenizer, s) for s in SENTENCES])
    assert got.dtype == torch.float32 and got.shape == (len(SENTENCES), 32)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-6, rtol=0)


def test_sentence_embeddings_truncate_to_max_length(model, tokenizer) -> None:
    got = embeddings.sentence_embeddings(model, tokenizer, SENTENCES, max_length=5)
    expected = torch.stack([reference_embedding(model, tokenizer, s, max_length=5) for s in SENTENCES])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    # truncation matters: the long sentences differ from their full-length embeddings
    full = embeddings.sentence_embeddings(model, tokenizer, SENTENCES)
    assert (got[2] - full[2]).abs().max() > 1e-3


def test_sentence_embeddings_float32_output_of_float64_model(tokenizer) -> None:
    model = tiny_bert().double()
    got = embeddings.sentence_embeddings(model, tokenizer, SENTENCES)
    expected = torch.stack([reference_embedding(model, tokenizer, s) for s in SENTENCES]).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_sentence_embeddings_restore_training_mode_and_need_no_grad(tokenizer) -> None:
    model = tiny_bert().train()  # dropout on: eval mode inside is what makes the result deterministic
    first = embeddings.sentence_embeddings(model, tokenizer, SENTENCES)
    second = embeddings.sentence_embeddings(model, tokenizer, SENTENCES)
    assert model.training
    assert torch.equal(first, second) and not first.requires_grad


def test_embedding_drift_equals_reference(model, tokenizer) -> None:
    noisy = perturbed(model, 0.3)
    got = embeddings.embedding_drift(noisy, model, tokenizer, SENTENCES, batch_size=4)
    ours = embeddings.sentence_embeddings(noisy, tokenizer, SENTENCES).double().numpy()
    base = embeddings.sentence_embeddings(model, tokenizer, SENTENCES).double().numpy()
    expected = reference_drift(ours, base)
    assert got.to_dict().keys() == expected.keys()
    for key, value in expected.items():
        assert got.to_dict()[key] == pytest.approx(value, abs=1e-9), key
    assert got.num_sentences == len(SENTENCES)
    assert 0 < got.min_cosine <= got.p01_cosine <= got.mean_cosine < 1  # really perturbed
    assert got.similarity_mean_abs_diff > 0


def test_embedding_drift_grows_with_noise(model, tokenizer) -> None:
    small, large = (embeddings.embedding_drift(perturbed(model, s), model, tokenizer, SENTENCES) for s in (0.05, 0.5))
    assert 1 - small.mean_cosine < 1 - large.mean_cosine
    assert small.similarity_mean_abs_diff < large.similarity_mean_abs_diff


def test_embedding_drift_of_model_with_itself(model, tokenizer) -> None:
    same = embeddings.embedding_drift(model, model, tokenizer, SENTENCES)
    assert same.mean_cosine == pytest.approx(1, abs=1e-12) and same.min_cosine == pytest.approx(1, abs=1e-12)
    assert same.similarity_pearson == pytest.approx(1, abs=1e-12)
    assert same.similarity_spearman == pytest.approx(1, abs=1e-12)
    assert same.similarity_mean_abs_diff == 0


def test_compare_embeddings_by_hand() -> None:
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ours = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # row 3 rotated by 45 degrees; row 1 only scaled
    got = embeddings.compare_embeddings(ours, base)
    assert got.mean_cosine == pytest.approx((1 + 1 + 0.5 ** 0.5) / 3)
    assert got.min_cosine == pytest.approx(0.5 ** 0.5)
    # pairs (0,1), (0,2), (1,2): ours 0, 1, 0; base 0, 0.7071, 0.7071
    assert got.similarity_mean_abs_diff == pytest.approx((0 + (1 - 0.5 ** 0.5) + 0.5 ** 0.5) / 3)
    assert got.similarity_pearson == pytest.approx(np.corrcoef([0, 1, 0], [0, 0.5 ** 0.5, 0.5 ** 0.5])[0, 1])
    # ranks with ties averaged: ours [0.5, 2, 0.5], base [0, 1.5, 1.5]
    assert got.similarity_spearman == pytest.approx(np.corrcoef([0.5, 2, 0.5], [0, 1.5, 1.5])[0, 1])


def test_average_ranks_with_ties() -> None:
    values = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    assert embeddings._average_ranks(values).tolist() == [4.0, 0.5, 4.0, 2.0, 0.5, 4.0]
    scipy_stats = pytest.importorskip("scipy.stats")
    noisy = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(0)).double()
    np.testing.assert_allclose(embeddings._average_ranks(noisy).numpy() + 1, scipy_stats.rankdata(noisy.numpy()))


def test_constant_similarities_give_nan_correlation() -> None:
    base = torch.eye(3)  # every pair orthogonal: a constant triangle
    got = embeddings.compare_embeddings(base.clone(), base)
    assert np.isnan(got.similarity_pearson) and np.isnan(got.similarity_spearman)
    assert got.mean_cosine == 1 and got.similarity_mean_abs_diff == 0


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"sentences": "one string"}, "sentences"),
    ({"sentences": []}, "sentences"),
    ({"sentences": ["fine", ""]}, r"sentences\[1\]"),
    ({"sentences": ["fine", 3]}, r"sentences\[1\]"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"max_length": 0}, "max_length"),
    ({"max_length": 129}, "max_length"),
    ({"max_length": 8.0}, "max_length"),
])
def test_sentence_embeddings_validate_arguments(model, tokenizer, kwargs, name) -> None:
    arguments = {"sentences": SENTENCES, **kwargs}
    with pytest.raises(ValueError, match=name):
        embeddings.sentence_embeddings(model, tokenizer, **arguments)


def test_sentence_embeddings_need_pad_token_and_hidden_state(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="pad_token"):
        embeddings.sentence_embeddings(model, tiny_bert_tokenizer(pad=False), SENTENCES)
    torch.manual_seed(0)
    masked_lm = BertForMaskedLM(model.config).eval()
    with pytest.raises(ValueError, match="last_hidden_state"):
        embeddings.sentence_embeddings(masked_lm, tokenizer, SENTENCES)


def test_embedding_drift_and_compare_validate_arguments(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="sentences"):
        embeddings.embedding_drift(model, model, tokenizer, SENTENCES[:2])
    with pytest.raises(ValueError, match="base_embeddings"):
        embeddings.compare_embeddings(torch.ones(4, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="base_embeddings"):
        embeddings.compare_embeddings(torch.ones(4, 3), torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="embeddings"):
        embeddings.compare_embeddings(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="embeddings"):
        embeddings.compare_embeddings(torch.ones(3), torch.ones(3))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"n": 0}, "n"), ({"n": 2.0}, "n"), ({"n": 2, "split": "dev"}, "split"), ({"n": 2, "min_words": 0}, "min_words"),
])
def test_test_sentences_validate_arguments(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        embeddings.test_sentences(**kwargs)


@pytest.mark.parametrize(("paragraph", "expected"), [
    ('He left. "Why?" she asked! Then (quietly) it rained.',
     ["He left.", '"Why?" she asked!', "Then (quietly) it rained."]),
    ("Mr. Smith met Dr. J. F. Kennedy in Washington, D.C. at 5 p.m. yesterday.",
     ["Mr. Smith met Dr. J. F. Kennedy in Washington, D.C. at 5 p.m. yesterday."]),
    ("It was won by Mayor-nominate Ivan Allen Jr.. The jury said so.",
     ["It was won by Mayor-nominate Ivan Allen Jr..", "The jury said so."]),
    ('He said, "Go home." 1961 was a year. The ex-Gov. Knight spoke.',
     ['He said, "Go home."', "1961 was a year.", "The ex-Gov. Knight spoke."]),
    ("No end here", ["No end here"]),
    ("lower case after. a period stays together.", ["lower case after. a period stays together."]),
])
def test_split_sentences(paragraph, expected) -> None:
    assert embeddings.split_sentences(paragraph) == expected


@pytest.mark.integration
def test_test_sentences_of_the_brown_test_split() -> None:
    sentences = embeddings.test_sentences(300)
    assert sentences[0] == ("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
                            'election produced "no evidence" that any irregularities took place.')
    assert sentences[:40] == embeddings.test_sentences(40)  # a prefix: deterministic, first n
    assert all(len(s.split()) >= 5 and "\n" not in s for s in sentences)
    assert len(set(sentences)) > 290
    long_only = embeddings.test_sentences(50, min_words=20)
    assert all(len(s.split()) >= 20 for s in long_only) and long_only != sentences[:50]
    validation = embeddings.test_sentences(5, split="validation")
    assert not set(validation) & set(sentences)
    with pytest.raises(ValueError, match="n=10000000"):
        embeddings.test_sentences(10_000_000)
