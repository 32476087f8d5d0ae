"""``hfquant recommend``: measure the candidates on this machine and this model, then pick one.

Nothing here is a stored number: the hardware is probed (CPU flags, CUDA device, which kernels of
:mod:`hfquant.nn.kernels` run), speed is timed on the model's own linear-layer shapes (one
:class:`QuantLinear` per distinct shape, prepared for its kernel, times the number of such layers),
and quality is the KL divergence from the float model on a short slice of text, after quantizing
the real model with each candidate (calibrated candidates on a small calibration sample, which the
table says).
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hfquant import workflows
from hfquant.evaluation.drift import drift
from hfquant.formats import format_from_dict
from hfquant.hf.config import HfQuantConfig
from hfquant.hf.integration import linear_layers, linear_shape
from hfquant.nn import kernels
from hfquant.nn.qlinear import QuantLinear
from hfquant.schemes import LayerScheme
from hfquant.stats import storage_stats

DEFAULT_CANDIDATES = ("int8", "int4-g128", "gptq:int4-g128", "nf4-g64", "int3-g128", "gptq:int3-g128", "int2-g64")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "sve")
FLOAT_ROW = "float"


@dataclass(frozen=True)
class Hardware:
    """What this machine offers hfquant."""

    device: str
    cpu: str
    cpu_flags: tuple[str, ...]  # those of CPU_FLAGS this CPU has
    torch_cpu_capability: str  # the vector ISA torch's CPU kernels were dispatched to
    cuda: str | None  # device name and compute capability, when there is one
    kernels: dict[str, bool]  # hfquant kernel -> whether it runs here (for the chosen device)

    def lines(self) -> list[str]:
        flags = ", ".join(self.cpu_flags) or "none of " + ", ".join(CPU_FLAGS)
        runs = ", ".join(name for name, ok in self.kernels.items() if ok) or "none (reference path only)"
        return [f"CPU: {self.cpu} ({flags}; torch dispatches to {self.torch_cpu_capability})",
                f"CUDA: {self.cuda or 'none'}", f"hfquant kernels that run on {self.device}: {runs}"]


def probe_hardware(device: str = "cpu") -> Hardware:
    """Probe CPU flags (``/proc/cpuinfo``), CUDA, and which kernels run on ``device`` in bfloat16/float32."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not allowed; expected 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' is not allowed here: torch sees no CUDA device; use --device cpu")
    flags: set[str] = set()
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
            elif key.strip() == "model name":
                cpu = value.strip()
    cuda = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        cuda = f"{torch.cuda.get_device_name()} (sm{major}{minor})"
    works = {name: any(kernels.kernel_works(name, device, dtype) for dtype in (torch.bfloat16, torch.float32))
             for name, kernel in kernels.KERNELS.items() if kernel.device_type == device}
    return Hardware(device, cpu, tuple(f for f in CPU_FLAGS if f in flags), torch.backends.cpu.get_cpu_capability(),
                    cuda, works)


@dataclass
class Row:
    """One candidate, measured."""

    spec: str  # "[method:]format-spec", or FLOAT_ROW
    method: str
    bits_per_weight: float  # stored bits per weight of the quantized layers (32/16 for the float row)
    checkpoint_mb: float
    decode_ms: float  # all linear layers, 1 token
    prefill_ms: float  # all linear layers, `prefill_tokens` tokens
    needs_data: bool
    mean_kl: float | None = None
    mean_kl_stderr: float | None = None
    note: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)  # HfQuantConfig keyword arguments


def model_linear_shapes(model_path: str) -> Counter[tuple[int, int]]:
    """``Counter((in, out))`` of the linear layers hfquant quantizes by default (not the output head)."""
    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return Counter(linear_shape(m) for _, m in linear_layers(model) if m is not head)


def time_linears(shapes: Counter[tuple[int, int]], scheme: LayerScheme | None, tokens: int, device: str,
                 dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Milliseconds for one forward of every layer (sum over shapes of count x best-of-``repeats`` time)."""
    total = 0.0
    gen = torch.Generator().manual_seed(0)
    for (in_features, out_features), count in shapes.items():
        weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
        layer: nn.Module
        if scheme is None:
            layer = nn.Linear(in_features, out_features, bias=False).to(dtype)
            layer.weight.data.copy_(weight)
        else:
            layer = QuantLinear(in_features, out_features, scheme, bias=False, dtype=dtype)
            layer.load_quantized(scheme.weight.quantize(weight))
        layer = layer.to(device)
        if isinstance(layer, QuantLinear):
            layer.prepare_kernel(dtype)
        x = torch.randn(tokens, in_features, generator=gen).to(device=device, dtype=dtype)
        best = float("inf")
        with torch.inference_mode():
            layer(x)  # warm-up (first-call allocations, kernel selection)
            for _ in range(repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                layer(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
        total += best * count
    return 1e3 * total


def spec_kwargs(spec: str) -> dict[str, Any]:
    """HfQuantConfig keyword arguments of a ``[method:]format-spec`` candidate, the method always named."""
    return {"method": "rtn", **workflows.parse_spec(spec)}


def measure(model_path: str, specs: Sequence[str], eval_ids: torch.Tensor, calibration_ids: torch.Tensor,
            device: str = "cpu", prefill_tokens: int = 128, target_bits: float | None = None,
            seqlen: int = 256) -> list[Row]:
    """The float row, then one measured row per candidate (and the allocation, for ``target_bits``)."""
    shapes = model_linear_shapes(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
    float_bits = 8 * next(p for p in base.parameters()).element_size()
    rows = [Row(FLOAT_ROW, "-", float_bits, storage_stats(base).total_bytes / 1e6,
                time_linears(shapes, None, 1, device), time_linears(shapes, None, prefill_tokens, device), False)]
    candidates = [(spec, spec_kwargs(spec)) for spec in specs]
    if target_bits is not None:
        method = "gptq" if any(kw["method"] == "gptq" for _, kw in candidates) else "rtn"
        formats = list({format_from_dict(kw["format"]).name: kw["format"] for _, kw in candidates}.values())
        candidates.append((f"auto {target_bits} bits ({method})",
                           {"target_bits": target_bits, "candidates": formats, "method": method}))
    for spec, kwargs in candidates:
        config = HfQuantConfig(**kwargs)
        needs_data = config.calibrated
        if needs_data:
            kwargs = {**kwargs, "dataset": calibration_ids}
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=HfQuantConfig(**kwargs))
        model = model.to(device).eval()
        stats = storage_stats(model)
        schemes = Counter(m.scheme for m in model.modules() if isinstance(m, QuantLinear))
        decode, prefill = _plan_times(model, shapes, device, prefill_tokens)
        result = drift(model, base, eval_ids, seqlen=seqlen, progress=False)
        note = f"calibrated on {calibration_ids.shape[0]} x {calibration_ids.shape[1]} tokens" if needs_data else ""
        if len(schemes) > 1:
            note = f"{note}; {len(schemes)} formats".lstrip("; ")
        rows.append(Row(spec, config.method, stats.bits_per_weight, stats.total_bytes / 1e6, decode, prefill,
                        needs_data, result.mean_kl, result.mean_kl_stderr, note,
                        {k: v for k, v in kwargs.items() if k != "dataset"}))
        del model
    return rows


def _plan_times(model: nn.Module, shapes: Counter[tuple[int, int]], device: str, prefill_tokens: int) -> tuple[float, float]:
    """Decode and prefill ms of the quantized model's own layers (shape x scheme, timed once each); layers
    of ``shapes`` it kept in float are timed as float."""
    groups = Counter((m.in_features, m.out_features, m.scheme) for m in model.modules() if isinstance(m, QuantLinear))
    left = shapes - Counter({(i, o): n for (i, o, _), n in groups.items()})
    decode, prefill = time_linears(left, None, 1, device), time_linears(left, None, prefill_tokens, device)
    for (in_features, out_features, scheme), count in groups.items():
        one = Counter({(in_features, out_features): count})
        decode += time_linears(one, scheme, 1, device)
        prefill += time_linears(one, scheme, prefill_tokens, device)
    return decode, prefill


def pick(rows: Sequence[Row], bits: int | None = None, target_bits: float | None = None,
         max_mb: float | None = None) -> Row | None:
    """The lowest-KL candidate within the constraint (``bits``: code width; ``target_bits``: stored
    bits/weight; ``max_mb``: checkpoint size); ties go to the faster decode. ``None`` if none fits."""
    def fits(row: Row) -> bool:
        if row.spec == FLOAT_ROW or row.mean_kl is None:
            return False
        if bits is not None and "format" in row.kwargs and _code_bits(row) > bits:
            return False
        if target_bits is not None and row.bits_per_weight > target_bits:
            return False
        return max_mb is None or row.checkpoint_mb <= max_mb

    feasible = [row for row in rows if fits(row)]
    return min(feasible, key=lambda r: (r.mean_kl, r.decode_ms)) if feasible else None


def _code_bits(row: Row) -> int:
    return format_from_dict(row.kwargs["format"]).code_bits


def markdown(rows: Sequence[Row], prefill_tokens: int) -> str:
    """The candidate table, speeds as measured here, with the ratio to the float row."""
    base = rows[0]
    lines = [f"| candidate | method | bits/weight | checkpoint MB | decode ms (x float) | prefill {prefill_tokens} tok ms "
             "(x float) | needs data | mean KL ± SE | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = "-" if r.mean_kl is None else f"{r.mean_kl:.3g} ± {r.mean_kl_stderr or 0:.2g}"
        lines.append(f"| {r.spec} | {r.method} | {r.bits_per_weight:.2f} | {r.checkpoint_mb:.1f} | "
                     f"{r.decode_ms:.2f} ({base.decode_ms / r.decode_ms:.2f}x) | {r.prefill_ms:.1f} "
                     f"({base.prefill_ms / r.prefill_ms:.2f}x) | {'yes' if r.needs_data else 'no'} | {kl} | {r.note} |")
    return "\n".join(lines)


def command_line(row: Row, model: str | None) -> str:
    """``hfquant quantize`` arguments that reproduce ``row``."""
    parts = ["hfquant quantize", model or "", "OUT"]
    if "target_bits" in row.kwargs:
        parts += ["--target-bits", str(row.kwargs["target_bits"]), "--candidates",
                  *(format_from_dict(f).name for f in row.kwargs["candidates"])]
    else:
        fmt = format_from_dict(row.kwargs["format"])
        parts += ["--format", fmt.to_dict()["format"]]
        if "group_size" in fmt.to_dict():
            parts += ["--group-size", str(fmt.to_dict()["group_size"])]
        if "sym" in fmt.to_dict():
            parts.append("--sym" if fmt.to_dict()["sym"] else "--no-sym")
    if row.method != "rtn":
        parts += ["--method", row.method]
    return " ".join(p for p in parts if p)
