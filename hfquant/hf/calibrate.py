"""Calibrated quantization of a loaded transformers model (runs in the quantizer's after-load hook)."""

from __future__ import annotations

import logging
import torch
from transformers import AutoTokenizer, PreTrainedModel

from hfquant.algorithms import get_method
from hfquant.calibration.data import (calibration_batches, check_calibration_inputs, describe_source,
                                      is_tokenized, tokenized_batch)
from hfquant.calibration.pipeline import quantize_sequentially
from hfquant.hf.config import HfQuantConfig
from hfquant.formats import QuantizedWeight
from hfquant.hf.integration import check_finite_weights, float_weight, quantize_layer_in_place

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


def calibrate_and_quantize(model: PreTrainedModel, config: HfQuantConfig, batch_size: int = 8) -> None:
    """Quantize every layer of the config's resolved plan in place with its calibrated method."""
    layers = config.plan.layers
    check_finite_weights(model, list(layers))
    tokens = calibration_tokens(model, config)
    method = get_method(config.method)
    solver = method.solver(config.options, {name: scheme.weight for name, scheme in layers.items()})
    targets = {name: model.get_submodule(name) for name in layers}

    def replace(name: str, quantized: QuantizedWeight) -> None:
        quantize_layer_in_place(model, name, quantized, layers[name])

    done = quantize_sequentially(model, list(tokens.split(batch_size)), targets, solver, float_weight, replace)
    for name in [n for n in layers if n not in set(done)]:  # outside the decoder blocks: no block inputs
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
