"""`hfquant recommend`: probed hardware, measured rows, a pick within the budget."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hfquant import cli, recommend

SPECS = ["int8", "int4-g32", "gptq:int4-g32", "int2-g32"]


def _run(capsys: pytest.CaptureFixture, path: Path, *extra: str) -> str:
    cli.main(["recommend", str(path), "--tokens", "256", "--seqlen", "32", "--num-samples", "2",
              "--prefill-tokens", "16", "--candidates", *SPECS, *extra])
    return capsys.readouterr().out


@pytest.mark.integration
def test_recommend_measures_every_candidate_and_picks_within_the_budget(
        tiny_checkpoints: dict, capsys: pytest.CaptureFixture) -> None:
    out = _run(capsys, tiny_checkpoints["llama"], "--target-bits", "4")
    assert "hfquant kernels that run on cpu:" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    for spec in [*SPECS, "float", "auto 4.0 bits (gptq)"]:
        cells = [c.strip() for c in rows[spec].split("|")[1:-1]]
        assert re.fullmatch(r"\d+\.\d+ \(\d+\.\d+x\)", cells[4]), cells  # measured decode ms and its ratio
        assert re.fullmatch(r"\d+\.\d+ \(\d+\.\d+x\)", cells[5]), cells  # measured prefill ms
    picked = re.search(r"pick: (.+) \(lowest", out).group(1)
    assert picked in {"int2-g32", "auto 4.0 bits (gptq)"}  # the only rows at <= 4 stored bits/weight
    assert "hfquant quantize" in out and "hfquant.HfQuantConfig(" in out


def _row(spec: str, bits: float, kl: float, mb: float, decode: float = 1.0) -> recommend.Row:
    method, _, fmt = spec.rpartition(":")
    return recommend.Row(spec, method or "rtn", bits, mb, decode, 1.0, False, kl,
                         kwargs=recommend.spec_kwargs(spec))


def test_pick_respects_each_budget() -> None:
    rows = [_row("int8", 8.25, 0.01, 200), _row("int4-g128", 4.25, 0.2, 120), _row("int3-g128", 3.25, 0.8, 100),
            _row("gptq:int4-g128", 4.25, 0.1, 120, decode=2.0)]
    assert recommend.pick(rows).spec == "int8"
    assert recommend.pick(rows, bits=4).spec == "gptq:int4-g128"
    assert recommend.pick(rows, bits=3).spec == "int3-g128"
    assert recommend.pick(rows, target_bits=4.0).spec == "int3-g128"
    assert recommend.pick(rows, max_mb=150).spec == "gptq:int4-g128"
    assert recommend.pick(rows, max_mb=50) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="device='cuda' is not allowed here"):
        recommend.probe_hardware("cuda")
    with pytest.raises(ValueError, match="device='tpu' is not allowed"):
        recommend.probe_hardware("tpu")
