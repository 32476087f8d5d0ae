"""`hfquant quantize` / `save_quantized` never lose data: refusals, atomic replacement, recovery after a kill.

Every test works on real folders in ``tmp_path``; kills are simulated in-process (``os.replace``
failing) and for real (a subprocess that SIGKILLs itself at a chosen point of the save).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import hfquant
from hfquant import workflows
from hfquant.cli import main
from hfquant.hf import saving
from hfquant.hf.saving import check_output_folder, save_quantized

REPO = Path(hfquant.__file__).resolve().parent.parent


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to compare folders exactly."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture()
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the CLI gets as far as loading a model."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")
    monkeypatch.setattr(workflows, "load", load)


def _cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture()
def quantized(tiny_checkpoints: dict, tmp_path: Path) -> Path:
    """An hfquant checkpoint of the tiny Llama (int8), saved by the CLI."""
    out = tmp_path / "q"
    main(["quantize", str(tiny_checkpoints["llama"]), str(out), "--bits", "8"])
    return out


def _quantized_model(tiny_checkpoints: dict, bits: int = 4):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"],
                                                quantization_config=hfquant.HfQuantConfig(bits=bits, group_size=32))


# --- refusals, before anything is loaded -------------------------------------------------------


def test_quantize_into_a_non_empty_cwd_is_refused(tiny_checkpoints: dict, tmp_path: Path, monkeypatch, capsys,
                                                    no_load) -> None:
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "notes.txt").write_text("precious")
    (work / "src" / "a.py").write_text("x = 1")
    before = _tree(work)
    monkeypatch.chdir(work)
    err = _cli_error(capsys, ["quantize", str(tiny_checkpoints["llama"]), "."])
    assert "current folder" in err
    assert _tree(work) == before and _leftovers(tmp_path) == []


def test_non_empty_foreign_out_needs_overwrite(tiny_checkpoints: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.csv").write_text("1,2,3")
    err = _cli_error(capsys, ["quantize", str(tiny_checkpoints["llama"]), str(out), "--bits", "8"])
    assert f"OUT={str(out)!r}" in err
    assert _tree(out) == {"data.csv": b"1,2,3"}
    main(["quantize", str(tiny_checkpoints["llama"]), str(out), "--bits", "8", "--overwrite"])
    assert saving.is_hfquant_checkpoint(out) and not (out / "data.csv").exists()
    assert _leftovers(tmp_path) == []


def test_out_equal_to_model_is_refused_and_model_untouched(tiny_checkpoints: dict, tmp_path: Path, capsys,
                                                            no_load) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["llama"], model)
    before = _tree(model)
    for out in (model, model / "quantized", model / "sub" / "q"):
        for extra in ([], ["--overwrite"]):
            err = _cli_error(capsys, ["quantize", str(model), str(out), *extra])
            assert "MODEL" in err, err
    assert _tree(model) == before and _leftovers(tmp_path) == []


def test_model_inside_out_is_refused(tiny_checkpoints: dict, tmp_path: Path, capsys, no_load) -> None:
    model = tmp_path / "parent" / "model"
    shutil.copytree(tiny_checkpoints["llama"], model)
    before = _tree(tmp_path / "parent")
    err = _cli_error(capsys, ["quantize", str(model), str(tmp_path / "parent"), "--overwrite"])
    assert "inside OUT" in err
    assert _tree(tmp_path / "parent") == before


def test_requantizing_a_checkpoint_into_itself_is_refused(quantized: Path, capsys, no_load) -> None:
    before = _tree(quantized)
    err = _cli_error(capsys, ["quantize", str(quantized), str(quantized)])
    assert "MODEL" in err
    assert _tree(quantized) == before


def test_save_quantized_checks_the_source_model_folder(tiny_checkpoints: dict, tmp_path: Path) -> None:
    model = _quantized_model(tiny_checkpoints)
    with pytest.raises(ValueError, match="MODEL"):
        save_quantized(model, Path(model.name_or_path) / "q")
    assert not (Path(model.name_or_path) / "q").exists()


def test_out_is_a_file(tiny_checkpoints: dict, tmp_path: Path, capsys, no_load) -> None:
    (tmp_path / "out").write_text("not a folder")
    err = _cli_error(capsys, ["quantize", str(tiny_checkpoints["llama"]), str(tmp_path / "out")])
    assert "is a file" in err
    err = _cli_error(capsys, ["quantize", str(tiny_checkpoints["llama"]), str(tmp_path / "out" / "q")])
    assert "is a file" in err
    assert (tmp_path / "out").read_text() == "not a folder"


UNWRITABLE_SCRIPT = """
import sys
from hfquant import workflows
def load(*a, **k):
    sys.exit("the model was loaded before the output folder was checked")
workflows.load = load
from hfquant.cli import main
main(["quantize", sys.argv[1], sys.argv[2]])
"""


def test_unwritable_parent_is_one_error_line_before_loading(tiny_checkpoints: dict, tmp_path: Path) -> None:
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    command = [sys.executable, "-c", UNWRITABLE_SCRIPT, str(tiny_checkpoints["llama"]), str(parent / "q")]
    if os.geteuid() == 0:  # root ignores permission bits: run without the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder unwritable")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        parent.chmod(0o755)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot write" in lines[0], result.stderr
    assert list(parent.iterdir()) == []


# --- replacing an hfquant checkpoint -----------------------------------------------------------


def test_hfquant_checkpoint_is_replaced_without_overwrite(tiny_checkpoints: dict, quantized: Path) -> None:
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["format"] == "int8"
    main(["quantize", str(tiny_checkpoints["llama"]), str(quantized), "--bits", "4", "--group-size", "32"])
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["format"] == "int4"
    assert _leftovers(quantized.parent) == []


def test_failed_save_leaves_the_old_checkpoint(tiny_checkpoints: dict, quantized: Path, monkeypatch) -> None:
    before = _tree(quantized)
    model = _quantized_model(tiny_checkpoints)

    def broken_card(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(saving, "write_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, quantized)
    assert _tree(quantized) == before and _leftovers(quantized.parent) == []


def test_output_folder_has_normal_permissions(quantized: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert quantized.stat().st_mode & 0o777 == 0o755 & ~umask
    for path in quantized.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644 & ~umask, path.name


class _ReplaceFails:
    """``os.replace`` that raises from its call number ``at`` on (``once``: only that call), counting only
    renames into or out of ``parent`` (the swap of OUT, not files renamed inside the staging folder)."""

    def __init__(self, parent: Path, at: int, once: bool) -> None:
        self.real, self.parent, self.calls, self.at, self.once = os.replace, parent, 0, at, once

    def __call__(self, src, dst) -> None:
        if self.parent not in (Path(src).parent, Path(dst).parent):
            return self.real(src, dst)
        self.calls += 1
        if self.calls == self.at or (not self.once and self.calls > self.at):
            raise KeyboardInterrupt(f"killed at os.replace call {self.calls}")
        self.real(src, dst)


def test_interrupted_between_the_renames_keeps_the_old_checkpoint(tiny_checkpoints: dict, quantized: Path,
                                                                   monkeypatch) -> None:
    before = _tree(quantized)
    model = _quantized_model(tiny_checkpoints)
    monkeypatch.setattr(os, "replace", _ReplaceFails(quantized.parent, at=2, once=True))
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, quantized)
    assert _tree(quantized) == before and _leftovers(quantized.parent) == []


def test_dead_between_the_renames_is_restored_on_the_next_run(tiny_checkpoints: dict, quantized: Path,
                                                               monkeypatch) -> None:
    before = _tree(quantized)
    model = _quantized_model(tiny_checkpoints)
    failing = _ReplaceFails(quantized.parent, at=2, once=False)  # like a process that dies: nothing after the 2nd rename runs
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, quantized)
    monkeypatch.setattr(os, "replace", failing.real)
    assert not quantized.exists()
    [old] = [p for p in quantized.parent.iterdir() if p.name.startswith(f".{quantized.name}.old-")]
    assert _tree(old) == before  # the previous checkpoint is complete, aside
    assert check_output_folder(quantized) == quantized.resolve()  # the next run restores it first
    assert _tree(quantized) == before and _leftovers(quantized.parent) == []


KILL_SCRIPT = """
import os, signal, sys
import hfquant
from hfquant.hf import saving
from transformers import AutoModelForCausalLM
where = sys.argv[3]
real_replace = os.replace
calls = []
parent = os.path.dirname(os.path.abspath(sys.argv[2]))
def replace(src, dst):
    if parent in (os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(dst))):
        calls.append(1)
    if where == "between-renames" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
real_card = saving.write_card
def card(*a, **k):
    real_card(*a, **k)
    if where == "while-writing":
        os.kill(os.getpid(), signal.SIGKILL)
saving.write_card = card
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))
saving.save_quantized(model, sys.argv[2])
"""


@pytest.mark.parametrize("where", ["while-writing", "between-renames"])
def test_sigkilled_save_is_cleaned_up_or_restored(tiny_checkpoints: dict, quantized: Path, where: str) -> None:
    before = _tree(quantized)
    parent = quantized.parent
    # a folder named like a staging folder but without hfquant's marker: not ours, never deleted
    foreign = parent / f".{quantized.name}.tmp-1-abcdefgh"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("user data")
    command = [sys.executable, "-c", KILL_SCRIPT, str(tiny_checkpoints["llama"]), str(quantized), where]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == -signal.SIGKILL, result.stderr
    staging = [p for p in parent.iterdir() if p.name.startswith(f".{quantized.name}.tmp-") and p != foreign]
    assert len(staging) == 1 and (staging[0] / saving.MARKER).is_file()
    if where == "between-renames":
        assert not quantized.exists()
    else:
        assert _tree(quantized) == before

    model = _quantized_model(tiny_checkpoints)
    save_quantized(model, quantized)  # the next run: restores/cleans, then saves
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["format"] == "int4"
    assert _leftovers(parent) == [foreign.name] and _tree(foreign) == {"mine.txt": b"user data"}


def test_staging_folder_of_a_live_process_is_left_alone(quantized: Path) -> None:
    parent = quantized.parent
    live = parent / f".{quantized.name}.tmp-{os.getppid()}-abcdefgh"
    live.mkdir()
    (live / saving.MARKER).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    check_output_folder(quantized)
    assert live.is_dir()
