"""What every export shares: the per-layer report, the integer view of a quantized layer, the source model.

A target module (one per runtime) turns each :class:`~hfquant.nn.qlinear.QuantLinear` into the
target's tensors and reports it as a :class:`LayerExport`: ``exact`` when the target decodes to
hfquant's own dequantized weight bit for bit (measured, never assumed), ``re-quantized`` with the
measured error otherwise. What a target cannot hold is a ``ValueError`` naming the layer and format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfquant.formats import WeightFormat
from hfquant.formats.affine import IntAffine
from hfquant.hf.saving import EXPORT_REPORT, is_hfquant_checkpoint
from hfquant.nn.qembedding import QuantEmbedding
from hfquant.nn.qlinear import QuantLinear

EXACT = "exact"
REQUANTIZED = "re-quantized"


@dataclass(frozen=True)
class LayerExport:
    """How one quantized layer went into the target."""

    layer: str
    format: str  # hfquant's scheme name, e.g. int4-g128-asym
    target_type: str  # the target's name for what holds it, e.g. pack-quantized int4 group 128 asym
    max_abs_error: float  # max |target's decoded weight - hfquant's dequantized weight|
    rel_rms_error: float  # ||difference|| / ||hfquant's weight||

    @property
    def status(self) -> str:
        return EXACT if self.max_abs_error == 0.0 else REQUANTIZED


@dataclass
class ExportReport:
    """Per-layer outcome of an export, written to ``OUT/hfquant-export.json``."""

    target: str
    source: str
    layers: list[LayerExport] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)  # linear layers hfquant kept in full precision
    files: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {EXACT: 0, REQUANTIZED: 0}
        for layer in self.layers:
            counts[layer.status] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "source": self.source, "counts": self.counts(),
                "layers": [{**asdict(layer), "status": layer.status} for layer in self.layers],
                "float_layers": self.float_layers, "files": self.files}

    def write(self, folder: Path) -> None:
        (folder / EXPORT_REPORT).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        counts = self.counts()
        worst = max((layer.max_abs_error for layer in self.layers), default=0.0)
        return (f"{self.target}: {counts[EXACT]} layer(s) exact, {counts[REQUANTIZED]} re-quantized "
                f"(largest weight error {worst:.3g}), {len(self.float_layers)} kept in full precision")


def weight_error(target: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(max abs, relative RMS)`` difference of two weights, in float64."""
    diff = target.double() - reference.double()
    norm = reference.double().norm().item()
    return diff.abs().max().item() if diff.numel() else 0.0, diff.norm().item() / norm if norm else 0.0


@dataclass(frozen=True)
class IntegerGrid:
    """A layer's weight as ``w = (codes - zero) · scale`` per group, codes unsigned ``0 .. 2**bits - 1``."""

    codes: torch.Tensor  # (out, in) int64
    zero: torch.Tensor | None  # (out, groups) int64; None: the fixed zero 2**(bits - 1) (symmetric)
    scale: torch.Tensor  # (out, groups) float32, exactly the stored scales
    bits: int
    group_size: int  # -1 = per channel

    @property
    def symmetric(self) -> bool:
        return self.zero is None


def _integer_affine_grid(layer: QuantLinear) -> IntegerGrid:
    fmt = layer.fmt
    codes = fmt.unpack_codes(layer.weight)[:, :layer.in_features].to(torch.int64)
    zero = layer.weight_zero.to(torch.int64) if not fmt.sym else None
    return IntegerGrid(codes, zero, layer.weight_scale.float(), fmt.bits, fmt.group_size)


# format class -> its integer grid; formats not listed have none (their codes are not integers on a grid)
INTEGER_GRIDS: dict[type[WeightFormat], Callable[[QuantLinear], IntegerGrid]] = {IntAffine: _integer_affine_grid}


def integer_grid(layer: QuantLinear) -> IntegerGrid | None:
    """The integer grid of a quantized layer, or None when its format has none."""
    make = INTEGER_GRIDS.get(type(layer.fmt))
    return make(layer) if make else None


def refusal(target: str, layer: str, fmt: WeightFormat, reason: str) -> ValueError:
    return ValueError(f"layer {layer}: format {fmt.name} cannot be exported to {target}: {reason}")


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantLinear)]


def refuse_quantized_embeddings(target: str, model: nn.Module) -> None:
    """No target maps a quantized token embedding yet: refuse before writing a checkpoint that would be wrong."""
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            raise refusal(target, name, module.fmt, "quantized token embeddings are not exported yet; allowed: "
                          "a model quantized with embeddings=None")


def load_source(model_or_folder: Any) -> tuple[Any, Path | None]:
    """``(model, its folder or None)``: a loaded hfquant model as it is, or a saved hfquant checkpoint folder."""
    if isinstance(model_or_folder, nn.Module):
        if not quantized_layers(model_or_folder):
            raise ValueError("model_or_folder is a model without hfquant-quantized layers; quantize it first "
                             "(from_pretrained(..., quantization_config=hfquant.HfQuantConfig(...)))")
        return model_or_folder, None
    if not isinstance(model_or_folder, (str, os.PathLike)):
        raise ValueError(f"model_or_folder={model_or_folder!r} is not allowed; expected a quantized model or "
                         "the folder of a saved hfquant checkpoint")
    folder = Path(model_or_folder).expanduser()
    if not is_hfquant_checkpoint(folder):
        raise ValueError(f"model_or_folder={str(model_or_folder)!r} is not an hfquant checkpoint (no config.json "
                         "with quantization_config.quant_method='hfquant'); save one with `hfquant quantize` first")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder), folder


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def copy_side_files(source: Path | None, out: Path) -> list[str]:
    """Copy the tokenizer and generation files of the source folder into ``out``; the names copied."""
    if source is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            (out / name).write_bytes((source / name).read_bytes())
            copied.append(name)
    return copied
