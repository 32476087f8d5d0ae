"""Export to GGUF (llama.cpp): ``OUT/model.gguf`` with llama.cpp's tensor names, metadata and tokenizer.

Each quantized layer goes into the first block type of :data:`BLOCK_TYPES` (fewest bits per weight
first) that holds its grid as it is: hfquant's integer codes and float16 scales are copied into the
blocks, never re-rounded. Block layouts as ``gguf.quants`` (the package's reference decoder, which
transformers' GGUF loader also uses) decodes them, per block of consecutive input features:

| type | block | bytes | weight ``i`` | holds exactly |
|---|---|---|---|---|
| TQ2_0 | 256 | 64 codes, fp16 ``d`` | ``d · (t - 1)``, ``t`` 2 bits | ternary, binary (groups of 256k / per channel) |
| Q4_0 | 32 | fp16 ``d``, 16 | ``d · (n - 8)``, ``n`` a nibble | symmetric int2/3/4, ternary, binary |
| Q4_1 | 32 | fp16 ``d``, fp16 ``m``, 16 | ``d · n + m`` | asymmetric int2/3/4 if ``m = -zero · scale`` is an fp16 |
| Q8_0 | 32 | fp16 ``d``, 32 int8 | ``d · c`` | symmetric int8, fp4 (its values times 2 are integers) |

(Q4_0/Q4_1: weight ``i < 16`` is the low nibble of byte ``i``, ``i + 16`` its high nibble. TQ2_0:
weight ``i`` is bits ``2·((i % 128) // 32)`` of byte ``32·(i // 128) + i % 32``.) Groups must be whole
blocks (group size a multiple of the block, or per channel). ``fp16``/``bf16`` layers are written as
F16/BF16. Everything else (nf4, fp8, int8 asymmetric, groups smaller than a block, ...) is
re-quantized from hfquant's dequantized weight by ``gguf.quants`` into the type of
:data:`REQUANTIZE_TYPES` for its code width (Q8_0; F16 for rows that are not whole blocks). Every layer is decoded back and compared with
hfquant's weight: the report's error is measured, and ``exact`` means zero (a Q4_1 layer whose
``zero · scale`` does not fit a float16 is reported with that rounding as its error).

Layers with an activation mode are refused (llama.cpp quantizes activations its own way). Float
tensors are written as stored (F32/F16/BF16; 1-D ones as F32, as llama.cpp's converter does).
q/k rows are permuted into llama.cpp's rotary layout (:func:`llama_cpp_row_order`). Only the Llama
architecture (:data:`ARCHITECTURES`) and GPT-2-style byte-level BPE tokenizers
(:mod:`hfquant.export.gguf_vocab`) are written; other models are refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from hfquant.export.base import (ExportReport, LayerExport, integer_grid, quantized_layers, refusal,
                                 refuse_quantized_embeddings, weight_error)
from hfquant.export.gguf_vocab import GgufVocab, read_vocab, tokenizer_folder
from hfquant.formats import WeightFormat
from hfquant.formats.affine import IntAffine
from hfquant.formats.codebook import Codebook, UniformCodebook
from hfquant.formats.floatcast import FloatCast
from hfquant.nn.qlinear import QuantLinear

TARGET = "gguf"
GGUF_FILE = "model.gguf"
CODEBOOK_SHIFTS = (0, 1, 2)  # a codebook is an integer grid when its values times 2**shift are integers


# --- block encoders: pure numpy, codes (rows, blocks, block) -> bytes (rows, blocks * block bytes) ------------------

def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """``(rows, blocks)`` float32 -> ``(rows, blocks, 2)`` bytes of their float16 values."""
    return np.ascontiguousarray(values.astype(np.float16))[..., None].view(np.uint8)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """``(rows, blocks, 32)`` values 0..15 -> ``(rows, blocks, 16)`` bytes, weight ``i + 16`` in the high nibble."""
    codes = codes.astype(np.uint8)
    return codes[..., :16] | (codes[..., 16:] << np.uint8(4))


def _rows(*parts: np.ndarray) -> np.ndarray:
    blocks = np.concatenate(parts, axis=-1)
    return blocks.reshape(blocks.shape[0], -1)


def encode_q8_0(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    return _rows(_fp16_bytes(d), codes.astype(np.int8).view(np.uint8))


def encode_q4_0(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    return _rows(_fp16_bytes(d), _nibbles(codes + 8))


def encode_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    return _rows(_fp16_bytes(d), _fp16_bytes(m), _nibbles(codes))


def encode_tq2_0(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    rows, blocks, _ = codes.shape
    trits = (codes + 1).astype(np.uint8).reshape(rows, blocks, 2, 4, 32)  # (half, bit pair, byte)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
    packed = np.bitwise_or.reduce(trits << shifts, axis=3).reshape(rows, blocks, 64)
    return _rows(packed, _fp16_bytes(d))


@dataclass(frozen=True)
class BlockType:
    """A GGUF block type: ``w = d · c`` per block (or ``d · c + m`` when ``with_min``), ``c`` in ``codes``."""

    qtype: QType
    block: int
    codes: tuple[int, int]  # the integers a block holds: signed, or unsigned when with_min
    with_min: bool
    encode: Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]

    @property
    def bits_per_weight(self) -> float:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return 8 * size / block


BLOCK_TYPES = tuple(sorted((
    BlockType(QType.TQ2_0, 256, (-1, 2), False, encode_tq2_0),
    BlockType(QType.Q4_0, 32, (-8, 7), False, encode_q4_0),
    BlockType(QType.Q4_1, 32, (0, 15), True, encode_q4_1),
    BlockType(QType.Q8_0, 32, (-128, 127), False, encode_q8_0),
), key=lambda t: t.bits_per_weight))

# re-quantization by gguf.quants: (largest code width it stands in for, type); F16 takes any row length. Q8_0
# even for 4-bit codes: on SmolLM2, nf4-g64 re-quantized to Q4_1 had KL 0.35 against hfquant's own nf4 model
# (bench/results/export_requant_q4_1.md), twice the quantization error for the same size; Q8_0 keeps it small.
REQUANTIZE_TYPES = ((8, QType.Q8_0), (16, QType.F16))
FLOAT_TYPES = {torch.float32: QType.F32, torch.float16: QType.F16, torch.bfloat16: QType.BF16}


# --- a layer's grid: w = (codes - zero) · scale per group --------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """``w = codes · scale`` per (row, group) (``zero`` None: signed codes), else ``(codes - zero) · scale``."""

    codes: torch.Tensor  # (out, in) int64
    scale: torch.Tensor  # (out, groups) float32
    zero: torch.Tensor | None  # (out, groups) int64
    code_range: tuple[int, int]  # every code the format can produce
    group_size: int  # -1 = per channel


def _affine_grid(layer: QuantLinear) -> Grid:
    grid = integer_grid(layer)
    if grid.symmetric:
        half = 2 ** (grid.bits - 1)
        return Grid(grid.codes - half, grid.scale, None, (-half, half - 1), grid.group_size)
    return Grid(grid.codes, grid.scale, grid.zero, (0, 2**grid.bits - 1), grid.group_size)


def _codebook_grid(layer: QuantLinear) -> Grid | None:
    """Signed integer codes ``table[q] · 2**shift`` with scale ``scale / 2**shift``, when the table allows it."""
    fmt = layer.fmt
    table = fmt.dequantize(torch.arange(fmt.num_codes), {"scale": torch.ones(fmt.num_codes)}, torch.float32)
    shift = next((s for s in CODEBOOK_SHIFTS if torch.equal(table * 2**s, (table * 2**s).round())), None)
    if shift is None:
        return None
    codes = fmt.unpack_codes(layer.weight)[:, :layer.in_features]
    values = fmt.dequantize(codes, {"scale": torch.full((codes.shape[0], 1), 2.0**shift)}, torch.float32)
    return Grid(values.to(torch.int64), layer.weight_scale.float() / 2**shift, None,
                (int(table.min()) * 2**shift, int(table.max()) * 2**shift), fmt.group_size)


# format class -> its grid (None: not an integer grid); looked up along the class's MRO
GRIDS: dict[type[WeightFormat], Callable[[QuantLinear], Grid | None]] = {
    IntAffine: _affine_grid, UniformCodebook: _codebook_grid, Codebook: _codebook_grid}


def layer_grid(layer: QuantLinear) -> Grid | None:
    make = next((GRIDS[cls] for cls in type(layer.fmt).__mro__ if cls in GRIDS), None)
    return make(layer) if make else None


def holds(block_type: BlockType, grid: Grid, in_features: int) -> bool:
    """Whether ``block_type`` holds every code and scale of ``grid`` (before the float16 ``m`` of Q4_1)."""
    low, high = grid.code_range
    whole_blocks = in_features % block_type.block == 0 and (
        grid.group_size == -1 or grid.group_size % block_type.block == 0)
    signed = grid.zero is None
    return whole_blocks and signed != block_type.with_min and block_type.codes[0] <= low and high <= block_type.codes[1]


def per_block(values: torch.Tensor, in_features: int, group_size: int, block: int) -> torch.Tensor:
    """``(out, groups)`` values -> ``(out, in_features // block)``: the value of each block's group."""
    width = in_features if group_size == -1 else group_size
    return values[:, torch.arange(0, in_features, block) // width]


def encode_grid(grid: Grid, block_type: BlockType, in_features: int) -> np.ndarray:
    """The GGUF bytes ``(out, row bytes)`` of a grid that ``block_type`` holds."""
    d = per_block(grid.scale, in_features, grid.group_size, block_type.block)
    m = None if grid.zero is None else -(per_block(grid.zero, in_features, grid.group_size, block_type.block) * d)
    codes = grid.codes.reshape(grid.codes.shape[0], -1, block_type.block)
    return block_type.encode(codes.numpy(), d.numpy(), None if m is None else m.numpy())


def float_bytes(tensor: torch.Tensor) -> tuple[np.ndarray, QType]:
    """A float tensor as stored (1-D ones as F32): its bytes ``(rows, row bytes)`` and GGUF type."""
    tensor = tensor.detach().cpu()
    if tensor.dim() == 1:
        tensor = tensor.float()
    if tensor.dtype not in FLOAT_TYPES:
        raise ValueError(f"dtype {tensor.dtype} is not allowed; GGUF float tensors are {list(FLOAT_TYPES)}")
    return tensor.contiguous().view(torch.uint8).numpy(), FLOAT_TYPES[tensor.dtype]


def decode(data: np.ndarray, qtype: QType) -> torch.Tensor:
    """What GGUF readers decode from the bytes: ``gguf.quants.dequantize``, as float32."""
    return torch.from_numpy(np.require(gguf.quants.dequantize(data, qtype), np.float32, ["C", "W"]))


@dataclass(frozen=True)
class EncodedLayer:
    data: np.ndarray  # (out, row bytes) uint8, rows in Hugging Face order
    qtype: QType


def encode_layer(layer: QuantLinear) -> EncodedLayer:
    """The first of: an exact block type, the float type of a float format, re-quantization."""
    grid = layer_grid(layer)
    if grid is not None:
        block_type = next((t for t in BLOCK_TYPES if holds(t, grid, layer.in_features)), None)
        if block_type is not None:
            return EncodedLayer(encode_grid(grid, block_type, layer.in_features), block_type.qtype)
    weight = layer.dequantized_weight(torch.float32)
    if isinstance(layer.fmt, FloatCast):
        return EncodedLayer(*float_bytes(weight.to(layer.fmt.torch_dtype)))
    qtype = next(q for bits, q in REQUANTIZE_TYPES
                 if layer.fmt.code_bits <= bits and layer.in_features % gguf.GGML_QUANT_SIZES[q][0] == 0)
    data = weight.half().numpy() if qtype == QType.F16 else gguf.quants.quantize(weight.numpy(), qtype)
    return EncodedLayer(np.ascontiguousarray(data).view(np.uint8), qtype)


# --- architectures ---------------------------------------------------------------------------------------------

def llama_cpp_row_order(rows: int, n_heads: int) -> torch.Tensor:
    """Row ``k`` of llama.cpp's q/k weight is Hugging Face row ``order[k]``: each head's two rotary halves
    interleaved (llama.cpp's ``permute``; the inverse of :func:`hfquant.bundled.model.unpermute_qk`)."""
    if rows % (2 * n_heads):
        raise ValueError(f"rows={rows} is not divisible by 2 * n_heads = {2 * n_heads}")
    return torch.arange(rows).reshape(n_heads, 2, rows // n_heads // 2).transpose(1, 2).reshape(-1)


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))


@dataclass(frozen=True)
class Architecture:
    """A transformers model type that llama.cpp runs as ``arch``."""

    arch: gguf.MODEL_ARCH
    required: dict[str, Any]  # config attribute -> the only value the metadata can express
    permuted_heads: dict[str, str]  # module name suffix -> config attribute with its head count
    metadata: Callable[[gguf.GGUFWriter, Any], None]

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHITECTURES = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
                          {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"},
                          llama_metadata),
}
ROPE_TYPES = ("default",)  # others need llama.cpp's rope scaling metadata (and llama3's rope_freqs tensor)


def check_architecture(config: Any) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} cannot be exported to {TARGET}; supported: {list(ARCHITECTURES)}")
    architecture = ARCHITECTURES[model_type]
    for field, value in architecture.required.items():
        if getattr(config, field, value) != value:
            raise ValueError(f"config.{field}={getattr(config, field)!r} cannot be exported to {TARGET}: "
                             f"llama.cpp's {architecture.name} metadata holds only {value!r}")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.rope_parameters rope_type={rope_type!r} cannot be exported to {TARGET}; "
                         f"allowed: {list(ROPE_TYPES)}")
    return architecture


def check_layer(name: str, layer: QuantLinear) -> None:
    if layer.scheme.input is not None:
        raise refusal(TARGET, name, layer.fmt, f"its input mode {layer.scheme.input.name!r} quantizes activations, "
                                               "which a GGUF file cannot express (llama.cpp quantizes them its "
                                               "own way); export a weight-only scheme")
    if layer.transposed_source:
        raise refusal(TARGET, name, layer.fmt, "it replaced a GPT-2 Conv1D; GGUF export takes nn.Linear layers")


# --- the export ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufTensor:
    name: str  # llama.cpp's
    data: np.ndarray  # uint8 (rows, row bytes), or (bytes,) for 1-D
    qtype: QType


def _gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"tensor {hf_name} has no llama.cpp name; it cannot be exported to {TARGET}")
    return name


def model_tensors(model: Any, architecture: Architecture, report: ExportReport) -> list[GgufTensor]:
    """Every tensor of ``model`` for the GGUF file; each quantized layer measured into ``report``."""
    config = model.config
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    layers = dict(quantized_layers(model))
    stored_keys = {f"{name}.{key}" for name, layer in layers.items() for key in layer.specs}
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head" not in layers
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        module_name = hf_name.rsplit(".", 1)[0]
        if (tied and hf_name == "lm_head.weight") or (hf_name in stored_keys and hf_name != f"{module_name}.weight"):
            continue
        heads = next((getattr(config, attr) for suffix, attr in architecture.permuted_heads.items()
                      if module_name.endswith(suffix)), None)
        order = None if heads is None else llama_cpp_row_order(tensor.shape[0], heads)
        if module_name in layers:
            layer = layers[module_name]
            encoded = encode_layer(layer)
            max_abs, rel = weight_error(decode(encoded.data, encoded.qtype), layer.dequantized_weight(torch.float32))
            report.layers.append(LayerExport(module_name, layer.scheme.name, encoded.qtype.name, max_abs, rel))
            data, qtype = encoded.data if order is None else encoded.data[order.numpy()], encoded.qtype
        else:
            data, qtype = float_bytes(tensor if order is None else tensor[order])
        tensors.append(GgufTensor(_gguf_name(names, hf_name), np.ascontiguousarray(data), qtype))
    return tensors


def write_gguf(path: Path, architecture: Architecture, config: Any, vocab: GgufVocab,
               tensors: list[GgufTensor]) -> None:
    writer = gguf.GGUFWriter(str(path), architecture.name)
    architecture.metadata(writer, config)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer)
    for tensor in tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(model: Any, out: Path, report: ExportReport) -> None:
    """Write ``model`` (hfquant-quantized, Llama) into the folder ``out`` as ``model.gguf``."""
    architecture = check_architecture(model.config)
    refuse_quantized_embeddings(TARGET, model)
    for name, layer in quantized_layers(model):
        check_layer(name, layer)
    vocab = read_vocab(tokenizer_folder(model), model.config.vocab_size)  # every refusal before the work
    tensors = model_tensors(model, architecture, report)
    report.float_layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    write_gguf(out / GGUF_FILE, architecture, model.config, vocab, tensors)
    report.files.append(GGUF_FILE)
