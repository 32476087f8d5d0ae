"""What a quantized model actually stores: bits per weight and bytes, read off its modules and files."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from hfquant.nn.qembedding import QuantEmbedding
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
    """What ``save_pretrained`` stores: the state dict, each distinct tensor once (tied weights share).

    Non-persistent buffers (e.g. kernel-layout copies of packed weights) are not counted. Quantized
    token embeddings count as quantized layers; a tied head sharing its embedding's table counts once.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    tables = {layer.weight.data_ptr(): layer for layer in layers.values()}  # a tied head shares its embedding's
    quantized_keys = {f"{name}.{key}" for name, layer in layers.items() for key in layer.stored()}
    quantized = other = 0
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        size = tensor.numel() * tensor.element_size()
        if key in quantized_keys:
            quantized += size
        else:
            other += size
    return StorageStats(
        quantized_layers=len(tables),
        quantized_weights=sum(layer.in_features * layer.out_features for layer in tables.values()),
        quantized_bytes=quantized,
        other_bytes=other,
    )


def checkpoint_bytes(folder: str | Path) -> int:
    """Size on disk of the safetensors weight files in a saved model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
