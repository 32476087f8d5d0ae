"""The sequential calibration engine shared by calibrated methods (GPTQ, AWQ) and block transforms (SmoothQuant, AWQ).

It runs the model block by block:

1. capture the inputs of the first decoder block for every calibration batch;
2. for each block, let each :class:`BlockTransform` rescale the float block (it sees the block and its
   inputs; the float output must stay the same), then find the order its linear layers are called in and group the layers that
   read the same input (q/k/v; gate/up), then, group by group ("true sequential"): observe the
   group's inputs while the block runs, let the method solve each layer, swap the layer in;
3. run the now-quantized block once more: its outputs are the next block's inputs.

Only one block's activations are held at a time. Blocks offloaded by accelerate are brought onto
their execution device one layer at a time while that layer is solved. The engine knows nothing
about any one method: a method is a :class:`LayerwiseSolver` and, optionally, block transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from accelerate.utils import align_module_device
from torch import nn
from tqdm.auto import tqdm

from hfquant.formats import QuantizedWeight


class LayerwiseSolver(Protocol):
    """What a calibrated method provides to the engine."""

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        """See one batch of a layer's inputs ``(..., in_features)``."""

    def solve(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        """Quantize a layer's ``(out, in)`` float weight from what was observed."""


class BlockTransform(Protocol):
    """Rewrites a float decoder block before its layers are solved (e.g. rescales channels between layers).

    Module names are relative to the block; ``prefix`` is the block's name in the model plus ``"."``.
    """

    def watch(self, block: nn.Module, prefix: str) -> dict[str, nn.Module]:
        """The block's modules whose inputs the transform needs to see (name → module)."""

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        """See one batch of a watched module's inputs ``(..., features)``, from the float block."""

    def apply(self, block: nn.Module, prefix: str) -> None:
        """Change ``block`` in place from what was observed."""


@dataclass
class BlockInputs:
    """The positional and keyword arguments one decoder block was called with, for one batch."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _StopForward(Exception):
    """Raised by the capture hook: nothing past the first block needs to run."""


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the ModuleList with ``num_hidden_layers`` entries."""
    depth = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of "
                     f"num_hidden_layers={depth} modules")


def outside_blocks(model: nn.Module, names: list[str]) -> list[str]:
    """Those of the module ``names`` that are not inside the model's decoder blocks (the engine never sees their inputs)."""
    blocks = find_blocks(model)
    prefix = next(f"{name}." for name, module in model.named_modules() if module is blocks)
    return [name for name in names if not name.startswith(prefix)]


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor]) -> list[BlockInputs]:
    """Run the model up to ``first_block`` on each batch and keep what the block receives."""
    captured: list[BlockInputs] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(BlockInputs(args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(model.device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _output_hidden_states(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _run_block(block: nn.Module, inputs: list[BlockInputs]) -> list[torch.Tensor]:
    return [_output_hidden_states(block(*x.args, **x.kwargs)) for x in inputs]


def _with_hidden_states(inputs: BlockInputs, hidden: torch.Tensor) -> BlockInputs:
    if inputs.args:
        return BlockInputs((hidden, *inputs.args[1:]), inputs.kwargs)
    return BlockInputs((), {**inputs.kwargs, "hidden_states": hidden})


def layer_groups(block: nn.Module, targets: dict[str, nn.Module], inputs: BlockInputs) -> list[list[str]]:
    """Target layers of ``block`` in call order, grouped by the input tensor they share."""
    calls: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their ids from being reused
    handles = [layer.register_forward_hook(lambda _m, args, _o, name=name: calls.append((name, args[0])))
               for name, layer in targets.items()]
    try:
        with torch.inference_mode():
            block(*inputs.args, **inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name, tensor in calls:
        group = groups.setdefault(id(tensor), [])
        if name not in group:
            group.append(name)
    return list(groups.values())


def quantize_sequentially(
    model: nn.Module,
    batches: list[torch.Tensor],
    targets: dict[str, nn.Module],
    solver: LayerwiseSolver,
    weight_of: Callable[[nn.Module], torch.Tensor],
    replace: Callable[[str, QuantizedWeight], None],
    progress: bool = True,
    transforms: Sequence[BlockTransform] = (),
) -> list[str]:
    """Quantize the ``targets`` (name → float layer) that live in decoder blocks; returns their names.

    ``weight_of`` gives a layer's ``(out, in)`` weight; ``replace`` swaps a solved layer into the model.
    ``transforms`` run on each float block, in order, before its layers are observed. A solver whose
    ``observes`` attribute is ``False`` (a data-free method) gets no inputs, which saves a block pass per group.
    """
    blocks = find_blocks(model)
    block_names = {id(m): n for n, m in model.named_modules()}
    inputs = capture_block_inputs(model, blocks[0], batches)
    done: list[str] = []
    for index, block in enumerate(tqdm(blocks, desc="Calibrating blocks", disable=not progress)):
        prefix = block_names[id(block)] + "."
        for transform in transforms:
            watched = transform.watch(block, prefix)
            if watched:
                run_with_input_hooks(block, watched, inputs, transform.observe)
            transform.apply(block, prefix)
        in_block = {n: m for n, m in targets.items() if n.startswith(prefix)}
        for group in layer_groups(block, in_block, inputs[0]) if in_block else []:
            if getattr(solver, "observes", True):
                run_with_input_hooks(block, {n: model.get_submodule(n) for n in group}, inputs, solver.observe)
            for name in group:
                layer = model.get_submodule(name)
                with align_module_device(layer):
                    weight = weight_of(layer).detach().float()
                replace(name, solver.solve(name, weight))
                done.append(name)
        with torch.inference_mode():
            inputs = [_with_hidden_states(x, h) for x, h in zip(inputs, _run_block(block, inputs))]
    return done


def run_with_input_hooks(block: nn.Module, layers: dict[str, nn.Module], inputs: list[BlockInputs],
                         see: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``block`` on every batch of ``inputs``; ``see(name, x)`` gets each call's input of each of ``layers``."""
    handles = [layer.register_forward_hook(lambda _m, args, _o, name=name: see(name, args[0]))
               for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            _run_block(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
