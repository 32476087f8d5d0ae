"""Tests for hfquant.calibration.data: calibration sources -> (num_samples, seqlen) token batches.

A tiny byte-level BPE tokenizer is trained in memory (no Hub). Its pre-tokenizer isolates whitespace
runs, so tokenizing rows with the joiner appended equals tokenizing the joined text, which the chunk
mode test relies on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset, DatasetDict
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from hfquant.calibration import data
from hfquant.calibration.data import CalibrationSpec, calibration_batches, describe_source, load_text

# fmt: off
WORDS = [
    "the", "a", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "weights", "are", "rounded", "to", "small",
    "grid", "of", "levels", "while", "activations", "stay", "in", "float", "and", "error", "is", "measured", "on",
    "held", "out", "text",
]
# fmt: on


def make_texts(n_rows: int, words_per_row: int = 30, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_row)) + "." for _ in range(n_rows)]


TEXTS = make_texts(40)


def build_tokenizer(model_max_length: int | None = None, cls: type = PreTrainedTokenizerFast):
    """Byte-level BPE (any text encodes), whitespace runs kept as their own pieces, BOS added by default."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return cls(tokenizer_object=backend, bos_token="<s>", **kwargs)


class CountingTokenizer(PreTrainedTokenizerFast):
    """Counts calls in a class attribute, so the instance (and its datasets fingerprint) is unchanged by them."""

    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh datasets cache per test (local files are loaded into it), and never the network."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path / "hf-datasets"


def reference_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The straightforward way: join all texts with the joiner and tokenize once, no special tokens."""
    return torch.tensor(tokenizer(data.JOINER.join(texts), add_special_tokens=False)["input_ids"])


def write_txt(path: Path, texts: list[str]) -> Path:
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return path


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


# --- sources --------------------------------------------------------------------------------------


def test_list_of_strings(tokenizer) -> None:
    ds = load_text(TEXTS, text_column="content")
    assert ds.column_names == ["content"] and ds["content"][:] == TEXTS
    batch = calibration_batches(tokenizer, TEXTS, num_samples=6, seqlen=32)
    assert batch.shape == (6, 32) and batch.dtype == torch.long


def test_dataset_and_datasetdict(tokenizer) -> None:
    ds = Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))})
    assert load_text(ds, text_column="body") is ds
    dd = DatasetDict({"train": ds, "validation": Dataset.from_dict({"body": TEXTS[:10], "n": list(range(10))})})
    assert load_text(dd, split="validation", text_column="body")["body"][:] == TEXTS[:10]
    chunked = calibration_batches(
        tokenizer, dd, num_samples=2, seqlen=40, mode="chunk", split="validation", text_column="body"
    )
    assert torch.equal(chunked.flatten(), reference_stream(tokenizer, TEXTS[:10])[:80])


def test_text_files(tokenizer, tmp_path: Path) -> None:
    one = write_txt(tmp_path / "one.txt", TEXTS[:20])
    two = write_txt(tmp_path / "two.txt", TEXTS[20:])
    assert load_text(one)["text"][:] == TEXTS[:20]  # one paragraph a row
    assert load_text(str(one), text_column="body").column_names == ["body"]
    assert load_text([one, str(two)])["text"][:] == TEXTS
    batch = calibration_batches(tokenizer, [str(one), str(two)], num_samples=3, seqlen=50, mode="chunk")
    assert torch.equal(batch.flatten(), reference_stream(tokenizer, TEXTS)[:150])


def test_json_files(tokenizer, tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "calib.jsonl", TEXTS, column="content")
    plain = tmp_path / "calib.json"
    plain.write_text(json.dumps([{"content": t} for t in TEXTS[:5]]), encoding="utf-8")
    assert load_text(jsonl, text_column="content")["content"][:] == TEXTS
    assert load_text(str(plain), text_column="content")["content"][:] == TEXTS[:5]
    assert calibration_batches(tokenizer, jsonl, num_samples=4, seqlen=16, text_column="content").shape == (4, 16)


def test_bundled_default_is_resolved_lazily(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = pytest.importorskip("hfquant.bundled.corpus", reason="hfquant.bundled.corpus is not importable yet")

    fake = DatasetDict(
        {s: Dataset.from_dict({"text": TEXTS[i::3]}) for i, s in enumerate(["train", "validation", "test"])}
    )
    monkeypatch.setattr(corpus, "brown_corpus", lambda cache_dir=None: fake)
    assert load_text(None, split="test")["text"][:] == TEXTS[2::3]
    assert calibration_batches(tokenizer, None, num_samples=2, seqlen=16, split="validation").shape == (2, 16)
    with pytest.raises(ValueError, match=r"split='dev'.*allowed: \['train', 'validation', 'test'\]"):
        load_text(None, split="dev")


def test_presets_are_data_passed_to_load_dataset(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(data.PRESETS) == {"wikitext2", "c4", "pile-val"}
    assert all(isinstance(p, data.Preset) for p in data.PRESETS.values())
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return Dataset.from_dict({"text": TEXTS})

    monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
    load_text("wikitext2", split="test")
    load_text("c4", split="validation")
    load_text("pile-val")  # fixed split, whatever is asked
    assert calls == [
        (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
        (
            ("allenai/c4",),
            {
                "data_files": {
                    "train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz",
                },
                "split": "validation",
            },
        ),
        (("mit-han-lab/pile-val-backup",), {"split": "validation"}),
    ]
    assert calibration_batches(tokenizer, "wikitext2", num_samples=2, seqlen=8).shape == (2, 8)
    with pytest.raises(ValueError, match=r"split='test'.*allenai/c4.*allowed: \['train', 'validation'\]"):
        load_text("c4", split="test")


def test_preset_without_hub_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(data.PresetUnavailableError, match="Hub") as info:
        load_text("pile-val")
    message = str(info.value)
    assert "mit-han-lab/pile-val-backup" in message
    assert "local file" in message and "datasets.Dataset" in message and "source=None" in message
    assert isinstance(info.value, ConnectionError)


# --- batches --------------------------------------------------------------------------------------


def test_random_mode_is_deterministic_windows_of_the_stream(tokenizer) -> None:
    stream = reference_stream(tokenizer, TEXTS)
    first = calibration_batches(tokenizer, TEXTS, num_samples=8, seqlen=24, seed=3)
    assert torch.equal(first, calibration_batches(tokenizer, TEXTS, num_samples=8, seqlen=24, seed=3))
    assert not torch.equal(first, calibration_batches(tokenizer, TEXTS, num_samples=8, seqlen=24, seed=4))
    windows = {tuple(stream[i : i + 24].tolist()) for i in range(len(stream) - 23)}
    assert all(tuple(row.tolist()) in windows for row in first)


def test_chunk_mode_equals_joined_text_reference(tokenizer) -> None:
    stream = reference_stream(tokenizer, TEXTS)
    fit = len(stream) // 64
    batch = calibration_batches(tokenizer, TEXTS, num_samples=fit, seqlen=64, mode="chunk", seed=123)
    assert torch.equal(batch, stream[: fit * 64].view(fit, 64))
    assert torch.equal(batch, calibration_batches(tokenizer, TEXTS, num_samples=fit, seqlen=64, mode="chunk"))


def test_no_special_tokens_in_stream(tokenizer) -> None:
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] == bos  # the tokenizer does add BOS by default
    stream = data.token_stream(tokenizer, load_text(TEXTS))
    assert bos not in stream.tolist()
    assert torch.equal(stream.long(), reference_stream(tokenizer, TEXTS))


def test_second_call_hits_datasets_cache(tmp_path: Path) -> None:
    counting = build_tokenizer(cls=CountingTokenizer)
    path = write_txt(tmp_path / "calib.txt", TEXTS)
    CountingTokenizer.calls = 0
    first = calibration_batches(counting, path, num_samples=4, seqlen=32)
    assert CountingTokenizer.calls > 0
    dataset = load_text(path)
    cache_dir = Path(dataset.cache_files[0]["filename"]).parent
    cached = sorted(cache_dir.glob("cache-*.arrow"))
    assert len(cached) == 1  # the tokenized rows, next to the loaded text
    stamp = cached[0].stat().st_mtime_ns

    CountingTokenizer.calls = 0
    assert torch.equal(first, calibration_batches(counting, path, num_samples=4, seqlen=32))
    assert CountingTokenizer.calls == 0
    # an equal tokenizer built afresh has the same fingerprint, so it reuses the cache too
    assert torch.equal(
        first, calibration_batches(build_tokenizer(cls=CountingTokenizer), path, num_samples=4, seqlen=32)
    )
    assert CountingTokenizer.calls == 0
    assert sorted(cache_dir.glob("cache-*.arrow")) == cached and cached[0].stat().st_mtime_ns == stamp


# --- errors ---------------------------------------------------------------------------------------


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"source='wikitext3'.*allowed: \['c4', 'pile-val', 'wikitext2'\]"):
        load_text("wikitext3")
    for bad in (42, [], ["text", 3], {"text": TEXTS}):
        with pytest.raises(ValueError, match=r"source of type \w+ is not supported; allowed:"):
            load_text(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "calib.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"source file type\(s\) \['.csv'\] not supported; allowed"):
        load_text(str(tmp_path / "calib.csv"))
    txt, jsonl = write_txt(tmp_path / "a.txt", TEXTS), write_jsonl(tmp_path / "b.jsonl", TEXTS)
    with pytest.raises(ValueError, match="source files mix text and JSON"):
        load_text([txt, jsonl])


def test_text_errors(tmp_path: Path) -> None:
    ds = Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))})
    with pytest.raises(ValueError, match=r"text_column='text'.*available columns: \['body', 'n'\]"):
        load_text(ds)
    with pytest.raises(ValueError, match=r"text_column='body'.*available columns: \['text', 'id'\]"):
        load_text(write_jsonl(tmp_path / "c.jsonl", TEXTS), text_column="body")
    with pytest.raises(ValueError, match="text_column='n'.*not strings"):
        load_text(ds, text_column="n")
    with pytest.raises(ValueError, match=r"split='test'.*allowed: \['train'\]"):
        load_text(DatasetDict({"train": ds}), split="test", text_column="body")
    with pytest.raises(ValueError, match="text_column='text'.*no non-blank text"):
        load_text(["", "  \n", "\t"])
    with pytest.raises(ValueError, match="text_column='body'.*no non-blank text"):
        load_text(ds.select([]), text_column="body")
    assert len(load_text(["", " ", "ok"])) == 3  # blank rows are kept (as in the GPTQ reference join)


def test_batch_parameter_errors(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"mode='shuffle'.*allowed: \['random', 'chunk'\]"):
        calibration_batches(tokenizer, TEXTS, mode="shuffle")
    with pytest.raises(ValueError, match="num_samples=0 must be a positive integer"):
        calibration_batches(tokenizer, TEXTS, num_samples=0)
    with pytest.raises(ValueError, match="seqlen=-1 must be a positive integer"):
        calibration_batches(tokenizer, TEXTS, seqlen=-1)
    with pytest.raises(TypeError, match="seed=1.5 must be an integer"):
        calibration_batches(tokenizer, TEXTS, seed=1.5)
    short = build_tokenizer(model_max_length=16)
    with pytest.raises(ValueError, match=r"seqlen=32 exceeds tokenizer.model_max_length=16; allowed: seqlen <= 16"):
        calibration_batches(short, TEXTS, seqlen=32)
    assert calibration_batches(short, TEXTS, num_samples=2, seqlen=16).shape == (2, 16)

    n_tokens = len(reference_stream(tokenizer, TEXTS[:2]))
    with pytest.raises(ValueError, match=rf"has only {n_tokens} tokens, fewer than seqlen=4096"):
        calibration_batches(tokenizer, TEXTS[:2], seqlen=4096)
    fit = n_tokens // 20
    with pytest.raises(ValueError, match=rf"only {fit} non-overlapping windows of seqlen=20.*num_samples=100"):
        calibration_batches(tokenizer, TEXTS[:2], num_samples=100, seqlen=20, mode="chunk")
    # random windows may overlap, so they need only one window's worth of text
    assert calibration_batches(tokenizer, TEXTS[:2], num_samples=100, seqlen=20).shape == (100, 20)


# --- provenance -----------------------------------------------------------------------------------


def test_describe_source_and_spec(tmp_path: Path) -> None:
    ds = Dataset.from_dict({"text": TEXTS})
    one, two = write_txt(tmp_path / "a.txt", TEXTS), write_txt(tmp_path / "b.txt", TEXTS)
    assert describe_source(None) == "bundled:brown"
    assert describe_source("c4") == "c4"
    assert describe_source(one) == "file:a.txt"
    assert describe_source([str(one), two]) == "files:a.txt,b.txt"
    assert describe_source(ds) == f"datasets.Dataset(fingerprint={ds._fingerprint})"
    assert describe_source(DatasetDict({"train": ds})) == f"datasets.DatasetDict(train={ds._fingerprint})"
    assert describe_source(TEXTS) == f"list[str] ({len(TEXTS)} texts)"
    assert all(text not in describe_source(TEXTS) for text in TEXTS)

    spec = CalibrationSpec.from_source("pile-val", num_samples=16, seqlen=512, seed=7)
    assert spec == CalibrationSpec("pile-val", "validation", 16, 512, 7, "random")
    assert spec.to_dict() == {
        "source_name": "pile-val",
        "split": "validation",
        "num_samples": 16,
        "seqlen": 512,
        "seed": 7,
        "mode": "random",
    }
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()
    assert CalibrationSpec.from_source(None, split="validation", mode="chunk").split == "validation"
    assert CalibrationSpec.from_source(TEXTS).split is None


# --- bundled corpus -------------------------------------------------------------------------------


@pytest.mark.integration
def test_bundled_brown_corpus(tokenizer) -> None:
    pytest.importorskip(
        "hfquant.bundled.corpus", reason="hfquant.bundled.corpus (the bundled Brown corpus) is not importable yet"
    )
    validation = load_text(None, split="validation")
    assert len(validation) > 0 and "text" in validation.column_names
    batch = calibration_batches(tokenizer, None, num_samples=8, seqlen=256, seed=0, split="validation")
    assert batch.shape == (8, 256)
    assert torch.equal(batch, calibration_batches(tokenizer, None, num_samples=8, seqlen=256, split="validation"))
    text = tokenizer.decode(batch[0])
    assert len(text) > 256 and text.isascii()
