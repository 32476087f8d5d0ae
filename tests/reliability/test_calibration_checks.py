"""Calibration data that cannot fit the model is a ValueError naming the field, before any quantization work."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hfquant import HfQuantConfig
from hfquant.hf import calibrate

TEXTS = ["the committee met on tuesday and voted to adjourn " * 8] * 4


def _wide_tokenizer(size: int = 3 * VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids go up to ``size - 1``; common words get the high ids."""
    words = ["[UNK]", *(f"w{i}" for i in range(size - 7)), "the", "committee", "met", "on", "tuesday", "and"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=128)


@pytest.fixture()
def no_quantization(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("quantization started before the calibration data was checked")
    monkeypatch.setattr(calibrate, "quantize_sequentially", fail)


def _gptq(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=HfQuantConfig(
        method="gptq", bits=4, group_size=32, **kwargs))


@pytest.mark.parametrize(("ids", "message"), [
    (torch.full((2, 16), VOCAB, dtype=torch.long), rf"dataset\[0, 0\]={VOCAB} .*\[0, {VOCAB - 1}\]"),
    (torch.tensor([[1, 2, 3, 4], [5, 6, 7, -1]]), rf"dataset\[1, 3\]=-1 .*\[0, {VOCAB - 1}\]"),
    (torch.zeros((0, 16), dtype=torch.long), r"dataset.*num_samples.*=0 .*\[1, "),
    (torch.zeros((2, 0), dtype=torch.long), r"dataset.*seqlen.*=0 .*\[2, "),
])
def test_bad_token_tensor(tiny_checkpoints: dict, no_quantization, ids: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _gptq(tiny_checkpoints["llama"], dataset=ids)


def test_tokenizer_larger_than_the_vocabulary(tiny_checkpoints: dict, no_quantization) -> None:
    with pytest.raises(ValueError, match=rf"tokenizer.*={3 * VOCAB - 1} .*\[0, {VOCAB - 1}\]"):
        _gptq(tiny_checkpoints["llama"], dataset=TEXTS, tokenizer=_wide_tokenizer(), num_samples=2, seqlen=16)


def test_models_own_tokenizer_that_does_not_fit(tiny_checkpoints: dict, tmp_path, no_quantization) -> None:
    folder = tmp_path / "mismatched"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).save_pretrained(folder)
    _wide_tokenizer().save_pretrained(folder)
    with pytest.raises(ValueError, match="tokenizer"):
        _gptq(folder, dataset=TEXTS, num_samples=2, seqlen=16)


def test_fitting_data_still_quantizes(tiny_checkpoints: dict) -> None:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    assert _gptq(tiny_checkpoints["llama"], dataset=ids).config.quantization_config.calibration["num_samples"] == 2
    model = _gptq(tiny_checkpoints["llama"], dataset=TEXTS, tokenizer=tiny_tokenizer(), num_samples=2, seqlen=16)
    assert model.config.quantization_config.calibration["seqlen"] == 16
