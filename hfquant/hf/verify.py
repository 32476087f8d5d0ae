"""Self-verifying checkpoints: the saved weights carry their plan, and a load checks both against each other.

Saving writes the resolved plan into every safetensors file's header metadata (``hfquant_plan``).
Before any tensor is loaded, :func:`verify_checkpoint` reads only the headers and checks that

* the plan of ``config.json`` is the one the weights were saved with (a hand-edited config with a
  changed group size or symmetry fails here, even when every shape still fits);
* every tensor each quantized layer's format declares is present with its exact dtype and shape;
* no layer the plan keeps in full precision has quantized tensors;
* a quantized tied output head (``lm_head`` tied to the token embedding) is checked under its
  embedding's name: the one stored table serves both.

Version-1 checkpoints predate the metadata: for them only the tensor checks run. After loading,
:func:`check_loaded_values` rejects out-of-range stored values (zero points above the largest code,
non-finite or non-positive scales, calibrated input scales included).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch
from safetensors import safe_open
from torch import nn

from hfquant.nn.qembedding import QuantEmbedding
from hfquant.nn.qlinear import QuantLinear
from hfquant.plan import ResolvedPlan

PLAN_METADATA_KEY = "hfquant_plan"
_SAFETENSORS_DTYPES = {torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                       torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_QUANTIZED_SUFFIXES = ("weight_scale", "weight_zero")


def plan_metadata(plan: ResolvedPlan) -> dict[str, str]:
    """The header metadata written into every saved safetensors file."""
    return {PLAN_METADATA_KEY: _canonical(plan.to_dict())}


def _canonical(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def require_safetensors(files: Iterable[str]) -> None:
    """hfquant reads weights only from safetensors: a pickle-based file (``.bin``, ``.pt``, ``.pth``,
    ``.ckpt``) is refused before anything is read from it, as it could run code when unpickled."""
    pickled = [str(f) for f in files if not str(f).endswith(".safetensors")]
    if pickled:
        raise ValueError(f"checkpoint file(s) {pickled[:3]} are not safetensors; hfquant loads weights only from "
                         "safetensors (a pickle-based file can run code when loaded). Convert the model in an "
                         "environment you trust (load it, then save_pretrained, which writes safetensors)")


def verify_checkpoint(files: Iterable[str], shapes: dict[str, tuple[int, int]], plan: ResolvedPlan,
                      require_metadata: bool, tied: dict[str, str] | None = None) -> None:
    """``ValueError`` naming the layer and tensor when the checkpoint does not match ``plan``.

    ``shapes`` maps every layer the plan may name (linear layers, the token embedding) to its
    ``(in_features, out_features)``. ``tied`` maps tied output heads to their embeddings: a tied
    head's tensors are its embedding's, stored once under the embedding's name.
    """
    tied = tied or {}
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    expected_plan = _canonical(plan.to_dict())
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise ValueError(f"checkpoint file {file} is not safetensors; hfquant loads only safetensors")
        with safe_open(file, framework="pt") as handle:
            saved_plan = (handle.metadata() or {}).get(PLAN_METADATA_KEY)
            if saved_plan is None and require_metadata:
                raise ValueError(f"checkpoint file {file} has no hfquant plan in its header, but config.json "
                                 "declares one: the weights were not saved with this config")
            if saved_plan is not None and saved_plan != expected_plan:
                raise ValueError(f"config.json's quantization plan differs from the plan checkpoint file {file} "
                                 "was saved with (was config.json edited?); the checkpoint does not match what "
                                 "it declares")
            for key in handle.keys():
                tensor = handle.get_slice(key)
                headers[key] = (tensor.get_dtype(), tuple(tensor.get_shape()))
    problems = []
    for name, scheme in plan.layers.items():
        if name in tied and plan.layers.get(tied[name]) == scheme:
            name = tied[name]  # checked under the embedding's name (the quantizer refuses differing schemes)
        in_features, out_features = shapes[name]
        for param, spec in {**scheme.weight.specs(out_features, in_features), **scheme.input_specs()}.items():
            key = f"{name}.{param}"
            want = (_SAFETENSORS_DTYPES[spec.dtype], spec.shape)
            if key not in headers:
                problems.append(f"layer {name}: tensor {param!r} is missing")
            elif headers[key] != want:
                problems.append(f"layer {name}: tensor {param!r} is {headers[key][0]} {headers[key][1]}, format "
                                f"{scheme.name} stores {want[0]} {want[1]}")
    for name in set(shapes) - set(plan.layers):
        stray = [s for s in _QUANTIZED_SUFFIXES if f"{name}.{s}" in headers]
        if stray:
            problems.append(f"layer {name}: the plan keeps it in full precision, but the checkpoint has {stray}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("checkpoint does not match its declared formats: " + "; ".join(problems[:5]) + more)


def check_loaded_values(model: nn.Module) -> None:
    """``ValueError`` naming the first quantized layer whose loaded values are out of range."""
    for name, layer in model.named_modules():
        if isinstance(layer, (QuantLinear, QuantEmbedding)):
            problem = layer.fmt.check_stored(layer.stored(), layer.in_features)
            if problem is None and layer.scheme.input is not None:
                problem = layer.scheme.input.check_stored(layer.input_params())
            if problem:
                raise ValueError(f"layer {name}: {problem}; the checkpoint is corrupted")
