"""What a quantized model actually stores: bits per weight and bytes, read off its modules and files."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from hfquant.nn.qlinear import QuantLinear


@dataclass(frozen=True)
class StorageStats:
    """Storage of a model's parameters, split into quantized layers and everything else."""

    quantized_layers: int
    quantized_weights: int  # weights (out * in) held by quantized layers
    quantized_bytes: int  # their packed codes + scales + zero points
    other_bytes: int  # every other parameter and buffer (embeddings, norms, biases, skipped layers)

    @property
    def bits_per_weight(self) -> float:
        """Bits stored per quantized weight, scales and zero points included."""
        return 8 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else float("nan")

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": self.bits_per_weight, "total_bytes": self.total_bytes}


def storage_stats(model: nn.Module) -> StorageStats:
    """Count each distinct tensor once (tied weights share storage)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    quantized_ids = {id(t) for layer in layers for t in layer.stored().values()}
    seen: set[int] = set()
    other = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in quantized_ids or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        other += tensor.numel() * tensor.element_size()
    return StorageStats(
        quantized_layers=len(layers),
        quantized_weights=sum(layer.in_features * layer.out_features for layer in layers),
        quantized_bytes=sum(t.numel() * t.element_size() for layer in layers for t in layer.stored().values()),
        other_bytes=other,
    )


def checkpoint_bytes(folder: str | Path) -> int:
    """Size on disk of the safetensors weight files in a saved model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
