"""Tokenized calibration examples (GPTQModel / AutoGPTQ style): same ids, same GPTQ result; padding never enters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant
from hfquant.calibration.data import calibration_batches, cut_windows, is_tokenized, tokenized_batch, unpadded_examples

TEXTS = [f"Sample {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(20)]
PAD = 1


def _examples(ids: torch.Tensor, pad_every: int = 2) -> list[dict[str, list[int]]]:
    """One dict a row; every ``pad_every``-th row right-padded with 3 masked tokens."""
    examples = []
    for index, row in enumerate(ids.tolist()):
        padding = 3 if index % pad_every == 0 else 0
        examples.append({"input_ids": row + [PAD] * padding, "attention_mask": [1] * len(row) + [0] * padding})
    return examples


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_token_dicts_equal_text_calibration_bit_exactly(tiny_checkpoints: dict) -> None:
    path = tiny_checkpoints["opt"]
    settings = {"bits": 4, "group_size": 32, "method": "gptq", "num_samples": 4, "seqlen": 32}
    text = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(dataset=TEXTS,
                                                                                                **settings))
    ids = calibration_batches(AutoTokenizer.from_pretrained(path), TEXTS, num_samples=4, seqlen=32, seed=0)
    for dataset in (_examples(ids), Dataset.from_list(_examples(ids))):
        tokens = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(
            dataset=dataset, **settings))
        expected, got = _state(text), _state(tokens)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
        assert tokens.config.quantization_config.calibration["num_samples"] == 4


def test_token_dicts_equal_tensor_calibration_bit_exactly(tiny_checkpoints: dict) -> None:
    path = tiny_checkpoints["llama"]
    ids = torch.randint(2, 100, (3, 16), generator=torch.Generator().manual_seed(3))
    settings = {"bits": 4, "group_size": 32, "method": "gptq"}
    tensor = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(dataset=ids,
                                                                                                  **settings))
    dicts = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(
        dataset=_examples(ids, pad_every=1), **settings))  # every row padded: the padding must not matter
    expected, got = _state(tensor), _state(dicts)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_padding_is_dropped() -> None:
    padded = [{"input_ids": [5, 6, 7, PAD, PAD], "attention_mask": [1, 1, 1, 0, 0]},
              {"input_ids": [PAD, 8, 9, 10], "attention_mask": [0, 1, 1, 1]}]  # left padding too
    assert torch.equal(tokenized_batch(padded, 2, 3, 0), torch.tensor([[5, 6, 7], [8, 9, 10]]))
    tensors = [{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]])}]
    assert torch.equal(unpadded_examples(tensors)[0], torch.tensor([5, 6, 7]))


def test_unequal_lengths_are_joined_and_windowed_like_text() -> None:
    examples = [{"input_ids": list(range(0, 7))}, {"input_ids": list(range(7, 10)), "attention_mask": [1, 1, 1]}]
    got = tokenized_batch(examples, num_samples=3, seqlen=4, seed=5)
    assert torch.equal(got, cut_windows(torch.arange(10), 3, 4, 5, "random", "x"))
    assert int(got.max()) <= 9


def test_is_tokenized() -> None:
    assert is_tokenized([{"input_ids": [1]}]) and is_tokenized(Dataset.from_dict({"input_ids": [[1, 2]]}))
    assert not is_tokenized(["text"]) and not is_tokenized(Dataset.from_dict({"text": ["a"]}))
    assert not is_tokenized(None) and not is_tokenized(torch.ones(2, 2, dtype=torch.long))


@pytest.mark.parametrize(("examples", "field"), [
    ([{"ids": [1, 2]}], r"dataset\[0\] has no 'input_ids'"),
    ([{"input_ids": [1, 2]}, {"input_ids": [[1, 2], [3, 4]]}], r"dataset\[1\]\['input_ids'\] must be a flat"),
    ([{"input_ids": [1.5, 2.0]}], r"dataset\[0\]\['input_ids'\] must be a flat sequence of integers"),
    ([{"input_ids": ["a", "b"]}], r"dataset\[0\]\['input_ids'\]"),
    ([{"input_ids": [1, 2], "attention_mask": [1]}], r"dataset\[0\]\['attention_mask'\] has 1 entries"),
    ([{"input_ids": [1, 2], "attention_mask": [1, 2]}], r"dataset\[0\]\['attention_mask'\] holds values"),
    ([{"input_ids": [1, 2], "attention_mask": [0, 0]}], r"dataset\[0\]\['input_ids'\] has no unmasked token"),
])
def test_bad_examples_name_the_field(examples: list, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tokenized_batch(examples, 1, 2, 0)


def test_bad_examples_fail_before_quantizing(tiny_checkpoints: dict, tmp_path: Path) -> None:
    config = hfquant.HfQuantConfig(method="gptq", dataset=[{"input_ids": [[1, 2], [3, 4]]}])
    with pytest.raises(ValueError, match=r"dataset\[0\]\['input_ids'\]"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)
    ids_out_of_vocab = hfquant.HfQuantConfig(method="gptq", dataset=[{"input_ids": [1, 10**6, 3]}])
    with pytest.raises(ValueError, match=r"dataset\[0, 1\]"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=ids_out_of_vocab)
