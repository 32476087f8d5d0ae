"""The CLI reports user errors as one `error: ...` line with exit status 2; bugs keep their traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hfquant
from hfquant import workflows
from hfquant.calibration import data
from hfquant.cli import main

REPO = Path(hfquant.__file__).resolve().parent.parent
TEXT = "\n\n".join(f"Paragraph {i}. The committee met on Tuesday and voted to adjourn." for i in range(40))


def _cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()  # progress bars and library log lines may come before it
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]] and "Traceback" not in err, err
    return lines[-1]


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_missing_model_folder(tmp_path: Path, capsys) -> None:
    for model in (str(tmp_path / "no-such-model"), "./no-such-model", "a/b/c"):
        err = _cli_error(capsys, ["quantize", model, str(tmp_path / "q")])
        assert repr(model) in err and "no such folder" in err, err
    err = _cli_error(capsys, ["eval", str(tmp_path / "no-such-model")])
    assert "no such folder" in err


def test_model_path_that_is_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "model.bin").write_bytes(b"\0")
    err = _cli_error(capsys, ["eval", str(tmp_path / "model.bin")])
    assert "is a file" in err


def test_broken_config_json(tiny_checkpoints: dict, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["llama"], model)
    (model / "config.json").write_text("{not json")
    err = _cli_error(capsys, ["quantize", str(model), str(tmp_path / "q")])
    assert "not a valid JSON file" in err


def test_missing_and_broken_dataset_files(tiny_checkpoints: dict, tmp_path: Path, capsys) -> None:
    common = ["--seqlen", "64", "--max-tokens", "256"]
    err = _cli_error(capsys, ["eval", str(tiny_checkpoints["opt"]), "--dataset", str(tmp_path / "x.txt"), *common])
    assert "not found" in err and "x.txt" in err
    (tmp_path / "bad.json").write_text('{"text": "abc", broken')
    err = _cli_error(capsys, ["eval", str(tiny_checkpoints["opt"]), "--dataset", str(tmp_path / "bad.json"), *common])
    assert "bad.json" in err and "JSON" in err


def test_unreachable_preset(tiny_checkpoints: dict, monkeypatch, capsys) -> None:
    def offline(self, split):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(data.Preset, "load", offline)
    err = _cli_error(capsys, ["eval", str(tiny_checkpoints["opt"]), "--dataset", "wikitext2", "--seqlen", "64"])
    assert "could not load calibration preset 'wikitext2'" in err


def test_a_bug_keeps_its_traceback(tiny_checkpoints: dict, text_file: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise TypeError("a genuine bug")
    monkeypatch.setattr(workflows, "evaluate", broken)
    with pytest.raises(TypeError, match="a genuine bug"):
        main(["eval", str(tiny_checkpoints["opt"]), "--dataset", str(text_file), "--seqlen", "64"])


@pytest.mark.parametrize("flags", [["--calib-dataset", "corpus.txt"], ["--num-samples", "4"], ["--calib-seqlen", "64"],
                                   ["--seed", "1"]])
def test_calibration_flags_with_rtn_are_an_error(tiny_checkpoints: dict, tmp_path: Path, capsys,
                                                  flags: list[str]) -> None:
    err = _cli_error(capsys, ["quantize", str(tiny_checkpoints["llama"]), str(tmp_path / "q"), "--method", "rtn",
                              *flags])
    assert flags[0] in err and "rtn" in err
    assert not (tmp_path / "q").exists()


def test_calibration_flags_with_gptq(tiny_checkpoints: dict, text_file: Path, tmp_path: Path) -> None:
    main(["quantize", str(tiny_checkpoints["llama"]), str(tmp_path / "q"), "--method", "gptq", "--calib-dataset",
          str(text_file), "--num-samples", "2", "--calib-seqlen", "32", "--seed", "3", "--group-size", "32"])
    calibration = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["calibration"]
    assert (calibration["num_samples"], calibration["seqlen"], calibration["seed"]) == (2, 32, 3)


def test_python_dash_m_hfquant(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "hfquant", "--help"], check=False, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hfquant ") and "quantize" in result.stdout
