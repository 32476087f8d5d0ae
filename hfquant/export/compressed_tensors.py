"""Export to compressed-tensors' ``pack-quantized`` layout (transformers' built-in loader, vLLM).

Per quantized ``nn.Linear`` with ``K`` inputs, ``N`` outputs, ``b`` bits (layout read off the
``compressed-tensors`` package's docs and its pack-quantized compressor):

| key | dtype | shape | meaning |
|---|---|---|---|
| ``weight_packed`` | int32 | ``(N, ceil(K·b/32))`` | signed codes ``c ∈ [-2**(b-1), 2**(b-1))`` plus ``2**(b-1)``, densely packed little-endian along K |
| ``weight_scale`` | model dtype | ``(N, G)`` (``G = 1`` per channel) | ``w = c · scale`` |
| ``weight_shape`` | int64 | ``(2,)`` | ``[N, K]`` |

hfquant's integer codes ``q ∈ [0, 2**b)`` (symmetric zero ``2**(b-1)``) are that grid shifted by ``2**(b-1)``
(``c = q - 2**(b-1)``), so the packed words are hfquant's own
(the same dense bit order) and every integer layer maps exactly: the decoded weights are compared
with hfquant's, and a difference would be reported. Symmetric grids only: asymmetric ones are
refused (see :data:`ASYMMETRIC_REASON`). Bit widths 2, 4, 8 only (32 is a multiple of
them, so the packing is the same in every compressed-tensors release; vLLM's kernels take 4 and 8).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hfquant.export.base import ExportReport, IntegerGrid, LayerExport, integer_grid, quantized_layers, refusal, \
    refuse_quantized_embeddings, weight_error
from hfquant.packing import pack, unpack

TARGET = "compressed-tensors"
LAYOUT = "pack-quantized"
BITS = (2, 4, 8)  # widths whose packing every compressed-tensors release shares
WEIGHTS_FILE = "model.safetensors"
# measured with transformers 5.25 and compressed-tensors 0.20.1: the loader allocates unpacked int8 zero points
# (N, G), so a checkpoint with the packed ones its compressor writes fails with a size mismatch, and unpacked
# ones would fail its int32 unpacking on the first forward pass
ASYMMETRIC_REASON = ("asymmetric grids (zero points) do not load in transformers' compressed-tensors loader "
                     "(transformers 5.25, compressed-tensors 0.20.1: size mismatch on weight_zero_point); "
                     "quantize this layer with sym=True")


def weight_args(grid: IntegerGrid) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationArgs`` of a grid."""
    grouped = grid.group_size != -1
    return {"num_bits": grid.bits, "type": "int", "symmetric": grid.symmetric,
            "strategy": "group" if grouped else "channel", "group_size": grid.group_size if grouped else None,
            "dynamic": False, "actorder": None, "observer": None}


def layer_tensors(grid: IntegerGrid, out_features: int, in_features: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one layer (keys without the module prefix)."""
    bits = grid.bits
    words = math.ceil(in_features * bits / 32)
    tensors = {"weight_packed": pack(grid.codes, bits)[:, :words].contiguous(),
               "weight_scale": grid.scale.to(dtype).contiguous(),
               "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}
    return tensors


def decode(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """The float32 weight compressed-tensors decodes from :func:`layer_tensors` (a straightforward reference)."""
    out_features, in_features = tensors["weight_shape"].tolist()
    offset = 2 ** (bits - 1)
    words = tensors["weight_packed"]
    codes = unpack(_pad_words(words, in_features, bits), bits, in_features).to(torch.int64) - offset
    width = in_features if group_size == -1 else group_size
    column_group = torch.arange(in_features) // width
    scale = tensors["weight_scale"].float()
    return codes.float() * scale[:, column_group]


def _pad_words(words: torch.Tensor, num_codes: int, bits: int) -> torch.Tensor:
    from hfquant.packing import packed_width

    return torch.nn.functional.pad(words, (0, packed_width(num_codes, bits) - words.shape[-1]))


def check_layer(name: str, layer: Any) -> IntegerGrid:
    """The layer's integer grid, or a ValueError naming layer, format and why the target cannot hold it."""
    fmt = layer.fmt
    if layer.scheme.input is not None:
        raise refusal(TARGET, name, fmt, f"its inputs are quantized too (activations={layer.scheme.input.name!r}), "
                                         "which this exporter does not write (it would drop the input "
                                         "quantization); export a weight-only model")
    if layer.transposed_source:
        raise refusal(TARGET, name, fmt, "compressed-tensors quantizes nn.Linear layers; this is a GPT-2 Conv1D")
    grid = integer_grid(layer)
    if grid is None:
        raise refusal(TARGET, name, fmt, "its codes are not integers on a scaled grid (allowed: int2, int4, int8)")
    if not grid.symmetric:
        raise refusal(TARGET, name, fmt, ASYMMETRIC_REASON)
    if grid.bits not in BITS:
        raise refusal(TARGET, name, fmt, f"{grid.bits}-bit codes; compressed-tensors' packing is the same in every "
                                         f"release only for {BITS} bits (quantize this layer as int4 or int8)")
    if grid.group_size != -1 and layer.in_features % grid.group_size:
        raise refusal(TARGET, name, fmt, f"in_features={layer.in_features} is not a multiple of group_size="
                                         f"{grid.group_size}; compressed-tensors needs whole groups")
    return grid


def export_compressed_tensors(model: Any, out: Path, report: ExportReport) -> None:
    """Write ``model`` (hfquant-quantized) into the folder ``out`` as a pack-quantized checkpoint."""
    refuse_quantized_embeddings(TARGET, model)
    layers = quantized_layers(model)
    grids = {name: check_layer(name, layer) for name, layer in layers}  # every refusal before any writing
    dtype = _model_dtype(model)
    quantized_keys = {f"{name}.{key}" for name, layer in layers for key in layer.specs}
    tensors = {key: t.detach().contiguous() for key, t in model.state_dict().items()
               if key not in quantized_keys and key not in _tied_keys(model)}
    groups: dict[str, dict[str, Any]] = {}
    for name, layer in layers:
        grid = grids[name]
        written = layer_tensors(grid, layer.out_features, layer.in_features, dtype)
        tensors.update({f"{name}.{key}": t for key, t in written.items()})
        args = weight_args(grid)
        scheme = layer.scheme.name
        group = groups.setdefault(scheme, {"targets": [], "weights": args, "input_activations": None,
                                           "output_activations": None, "format": LAYOUT})
        group["targets"].append(name)
        decoded = decode(written, grid.bits, grid.group_size)
        max_abs, rel = weight_error(decoded, layer.dequantized_weight(torch.float32))
        kind = f"{LAYOUT} int{grid.bits} {args['strategy']}{'' if args['group_size'] is None else ' ' + str(args['group_size'])} {'sym' if grid.symmetric else 'asym'}"
        report.layers.append(LayerExport(name, scheme, kind, max_abs, rel))
    report.float_layers = _float_linear_names(model)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": LAYOUT, "quantization_status": "compressed",
        "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
        "ignore": report.float_layers, "kv_cache_scheme": None, "global_compression_ratio": None,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    report.files += [WEIGHTS_FILE, "config.json"]


def _model_dtype(model: Any) -> torch.dtype:
    return next(p.dtype for n, p in model.named_parameters() if p.is_floating_point())


def _tied_keys(model: Any) -> set[str]:
    """Keys transformers' saver drops because they are tied to another tensor (e.g. ``lm_head.weight``)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def _float_linear_names(model: Any) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
