"""`hfquant install-hook`: a process that never imports hfquant loads an hfquant checkpoint, each in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.cli import main as cli_main
from hfquant.hf.saving import save_quantized
from hfquant.hook import PTH_NAME, install_hook, remove_hook

# A consumer like lm-eval's HF backend or a pipeline script: transformers only, after Python's start-up
# processed the site folder (site.addsitedir does what start-up does for site-packages).
CONSUMER = """
import site, sys
site.addsitedir(sys.argv[1])
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
ids = torch.arange(24)[None] % 100
with torch.no_grad():
    save_file({"logits": model(ids).logits.contiguous(), "imported": torch.tensor("hfquant" in sys.modules)},
              sys.argv[3])
"""


def _consume(site_dir: Path, model: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CONSUMER, str(site_dir), str(model), str(out)],
                          capture_output=True, text=True, cwd=out.parent)


@pytest.fixture(scope="module")
def saved_int4(tiny_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=hfquant.HfQuantConfig(
        format="int4", group_size=32))
    folder = save_quantized(model, tmp_path_factory.mktemp("hook") / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return folder, reloaded(torch.arange(24)[None] % 100).logits


def test_with_the_hook_a_process_that_never_imports_hfquant_loads_its_checkpoint(saved_int4, tmp_path: Path) -> None:
    folder, expected = saved_int4
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    install_hook(site_dir)
    result = _consume(site_dir, folder, tmp_path / "out.safetensors")
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_file(tmp_path / "out.safetensors")
    assert bool(out["imported"])
    torch.testing.assert_close(out["logits"], expected, atol=0, rtol=0)  # same code, same machine: bit-identical


def test_without_the_hook_the_same_process_fails(saved_int4, tmp_path: Path) -> None:
    folder, _ = saved_int4
    (tmp_path / "site").mkdir()
    result = _consume(tmp_path / "site", folder, tmp_path / "out.safetensors")
    assert result.returncode != 0 and not (tmp_path / "out.safetensors").exists()


def test_the_hook_does_not_import_hfquant_for_a_float_model(tiny_checkpoints, tmp_path: Path) -> None:
    install_hook(tmp_path)
    result = _consume(tmp_path, tiny_checkpoints["llama"], tmp_path / "out.safetensors")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not bool(load_file(tmp_path / "out.safetensors")["imported"])


def test_install_and_remove_touch_only_the_file_hfquant_wrote(tmp_path: Path) -> None:
    assert install_hook(tmp_path) == install_hook(tmp_path) == tmp_path / PTH_NAME  # idempotent
    assert [p.name for p in tmp_path.iterdir()] == [PTH_NAME]  # no staging file left
    assert remove_hook(tmp_path) == tmp_path / PTH_NAME and remove_hook(tmp_path) is None
    foreign = tmp_path / PTH_NAME
    foreign.write_text("import something_else\n")
    with pytest.raises(ValueError, match="not written by hfquant"):
        install_hook(tmp_path)
    with pytest.raises(ValueError, match="not written by hfquant"):
        remove_hook(tmp_path)
    assert foreign.read_text() == "import something_else\n"
    with pytest.raises(ValueError, match="site_dir=.*not an existing folder"):
        install_hook(tmp_path / "missing")


def test_cli_installs_and_removes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cli_main(["install-hook", "--site-dir", str(tmp_path)])
    assert (tmp_path / PTH_NAME).is_file() and "wrote" in capsys.readouterr().out
    cli_main(["install-hook", "--remove", "--site-dir", str(tmp_path)])
    assert not (tmp_path / PTH_NAME).exists() and "removed" in capsys.readouterr().out
