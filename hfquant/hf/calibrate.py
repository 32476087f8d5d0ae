"""Calibrated quantization of a loaded transformers model (runs in the quantizer's after-load hook)."""

from __future__ import annotations

import logging
import torch
from transformers import AutoTokenizer, PreTrainedModel

from hfquant.algorithms import DataFreeSolver, get_method
from hfquant.algorithms.smoothquant import SmoothQuant
from hfquant.calibration.data import (calibration_batches, check_calibration_inputs, describe_source,
                                      is_tokenized, tokenized_batch)
from hfquant.calibration.observers import OBSERVERS
from hfquant.calibration.pipeline import BlockTransform, outside_blocks, quantize_sequentially
from hfquant.calibration.static import ObservingSolver
from hfquant.hf.config import HfQuantConfig
from hfquant.formats import QuantizedWeight
from hfquant.allocation import Option, allocate, budget_from_bits_per_weight
from hfquant.hf.integration import check_finite_weights, float_weight, linear_shape, quantize_layer_in_place
from hfquant.plan import ResolvedPlan
from hfquant.sensitivity import measure_sensitivity

logger = logging.getLogger(__name__)


def calibration_tokens(model: PreTrainedModel, config: HfQuantConfig) -> torch.Tensor:
    """``(num_samples, seqlen)`` token ids from ``config.dataset``: text, pre-tokenized ids given as a tensor,
    or tokenized examples (a list of ``input_ids``/``attention_mask`` dicts, a tokenized ``datasets.Dataset``)."""
    dataset = config.dataset
    if is_tokenized(dataset):
        dataset = tokenized_batch(dataset, config.num_samples, config.seqlen, config.seed)
    check_calibration_inputs(model, dataset, config.tokenizer, AutoTokenizer.from_pretrained)
    if isinstance(dataset, torch.Tensor):
        if dataset.dim() != 2 or dataset.dtype != torch.long:
            raise ValueError(f"dataset given as a tensor must be int64 (num_samples, seqlen), got "
                             f"{dataset.dtype} {tuple(dataset.shape)}")
        config.num_samples, config.seqlen = dataset.shape
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and config.seqlen > max_positions:
        raise ValueError(f"seqlen={config.seqlen} is above the model's context of {max_positions} tokens; "
                         f"allowed: 2..{max_positions}")
    if isinstance(dataset, torch.Tensor):
        return dataset
    tokenizer = config.tokenizer
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer or model.name_or_path)
    return calibration_batches(tokenizer, config.dataset, num_samples=config.num_samples, seqlen=config.seqlen,
                               seed=config.seed)


def allocated_plan(model: PreTrainedModel, config: HfQuantConfig, batches: list[torch.Tensor]) -> ResolvedPlan:
    """One of ``config.candidates`` per layer of ``config.plan``, to ``config.target_bits`` on average.

    Layers inside the decoder blocks are allocated by measured sensitivity; layers outside them (no
    block inputs to measure on) get the largest candidate, counted in the budget.
    """
    method = get_method(config.method)
    candidates = [scheme.weight for scheme in config.candidates]
    targets = {name: model.get_submodule(name) for name in config.plan.layers}
    shapes = {name: linear_shape(layer) for name, layer in targets.items()}  # (in, out)
    errors = measure_sensitivity(model, batches, targets, candidates,
                                 lambda w, fmt: method.quantize(w, fmt, config.options), float_weight)
    sizes = {name: [fmt.stored_bits(out_f, in_f) for fmt in candidates] for name, (in_f, out_f) in shapes.items()}
    largest = max(range(len(candidates)), key=lambda i: sum(s[i] for s in sizes.values()))
    fixed = {name: largest for name in targets if name not in errors}
    weights = sum(in_f * out_f for in_f, out_f in shapes.values())
    budget = budget_from_bits_per_weight(config.target_bits, weights)
    fixed_bits = sum(sizes[n][largest] for n in fixed)
    smallest = fixed_bits + sum(min(sizes[n]) for n in errors)
    float_bits = torch.finfo(next(iter(targets.values())).weight.dtype).bits
    if budget < smallest or config.target_bits > float_bits:
        raise ValueError(f"target_bits={config.target_bits} is not allowed for this model and candidates "
                         f"{[c.name for c in candidates]}; allowed: from {smallest / weights:.3f} (every layer at "
                         f"its smallest candidate{', layers outside the blocks at the largest' if fixed else ''}) "
                         f"up to the float weights' {float_bits} bits")
    choice = allocate({n: [Option(b, e) for b, e in zip(sizes[n], errors[n])] for n in errors},
                      budget - fixed_bits) | fixed
    plan = ResolvedPlan({name: config.candidates[choice[name]] for name in config.plan.layers})
    logger.info("hfquant: allocated %s to %.3f bits/weight", plan.counts(), config.target_bits)
    return plan


def block_transforms(model: PreTrainedModel, config: HfQuantConfig) -> list[BlockTransform]:
    """The block transforms of ``config`` (SmoothQuant, the method's own), in the order they run; building them
    checks that the model's architecture has layer mappings (so this also serves as that check, before loading)."""
    transforms: list[BlockTransform] = []
    if config.smoothquant is not None:
        transforms.append(SmoothQuant(config.smoothquant, model.config))
    method = get_method(config.method)
    if method.transform is not None:
        formats = {name: scheme.weight for name, scheme in config.plan.layers.items()}
        transforms.append(method.transform(config.options, formats, model.config))
    return transforms


def calibrate_and_quantize(model: PreTrainedModel, config: HfQuantConfig, batch_size: int = 8) -> None:
    """Quantize every layer of the config's plan in place: allocated first when ``config.target_bits`` is
    set, then with the calibrated method (or, for a data-free method, its own path). Layers whose input
    mode is calibrated (``int8-static``) get their stored input tensors from ``config.observer`` on the
    inputs the engine shows the method (a data-free method then runs through the engine too)."""
    check_finite_weights(model, list(config.plan.layers))
    observed = {name: s.input for name, s in config.plan.layers.items() if s.input is not None and s.input.calibrated}
    for name in outside_blocks(model, list(observed)):  # before any calibration work
        raise ValueError(f"layer {name} is outside the decoder blocks, so its inputs are not observed during "
                         f"calibration; activations={observed[name].name!r} is allowed only on layers inside "
                         "them (give this layer a rule without it, or keep it in full precision)")
    tokens = calibration_tokens(model, config)
    batches = list(tokens.split(batch_size))
    if config.target_bits is not None:
        config.plan = allocated_plan(model, config, batches)
    layers = config.plan.layers
    method = get_method(config.method)

    formats = {name: scheme.weight for name, scheme in layers.items()}
    solver = ObservingSolver(method.solver(config.options, formats) if method.calibrated
                             else DataFreeSolver(method.quantize, config.options, formats),
                             observed, OBSERVERS[config.observer] if observed else None, config.observer_percentile)

    def replace(name: str, quantized: QuantizedWeight) -> None:
        layer = quantize_layer_in_place(model, name, quantized, layers[name])
        if name in observed:
            layer.load_input_params(solver.input_tensors(name))
            layer.prepare_kernel(model.dtype, mode=config.kernels)  # bit-identical to the reference path, faster

    done: list[str] = []
    transforms = block_transforms(model, config)
    if method.calibrated or observed or transforms:
        targets = {name: model.get_submodule(name) for name in layers}
        done = quantize_sequentially(model, batches, targets, solver, float_weight, replace, transforms=transforms)
    for name in [n for n in layers if n not in set(done)]:  # data-free, or outside the decoder blocks
        if done:
            logger.info("hfquant: %s is outside the decoder blocks; quantizing it with %s's data-free path",
                        name, method.name)
        weight = float_weight(model.get_submodule(name)).detach().float()
        replace(name, method.quantize(weight, layers[name].weight, config.options))
    config.calibration = {
        "dataset": "tensor" if isinstance(config.dataset, torch.Tensor) else describe_source(config.dataset),
        "num_samples": int(tokens.shape[0]),
        "seqlen": int(tokens.shape[1]),
        "seed": config.seed,
    }
