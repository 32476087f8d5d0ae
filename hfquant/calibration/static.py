"""Static activation scales through the sequential engine: solvers that also observe layer inputs.

:class:`ObservingSolver` wraps a method's :class:`~hfquant.calibration.pipeline.LayerwiseSolver`:
every batch of a layer's inputs that the engine shows the method is also counted into that layer's
``|x|`` histogram (:mod:`hfquant.calibration.observers`) when the layer's input mode is calibrated;
once the layer is solved, its observer's clip value becomes the mode's stored tensors
(:meth:`ObservingSolver.input_tensors`). The engine runs each block with the layers solved so far
already swapped in, so a layer's scale is calibrated on the inputs the quantized model gives it.
:class:`~hfquant.algorithms.DataFreeSolver` lets a data-free method (``rtn``) run through the engine for this.
"""

from __future__ import annotations


import torch

from hfquant.activations import ActivationMode
from hfquant.calibration.observers import AbsHistogram, Observer, add_to_histogram
from hfquant.calibration.pipeline import LayerwiseSolver
from hfquant.formats import QuantizedWeight


class ObservingSolver:
    """``solver`` plus input histograms of the layers in ``modes`` (their calibrated input modes)."""

    def __init__(self, solver: LayerwiseSolver, modes: dict[str, ActivationMode], observer: Observer,
                 percentile: float | None) -> None:
        self.solver, self.modes, self.observer, self.percentile = solver, modes, observer, percentile
        self.solver_observes = getattr(solver, "observes", True)
        self.observes = self.solver_observes or bool(modes)  # the engine skips observing when nobody needs it
        self.histograms: dict[str, AbsHistogram] = {}
        self.calibrated: dict[str, dict[str, torch.Tensor]] = {}

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        if self.solver_observes:
            self.solver.observe(name, inputs)
        if name in self.modes:
            add_to_histogram(self.histograms.setdefault(name, AbsHistogram()), inputs)

    def solve(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        quantized = self.solver.solve(name, weight)
        if name in self.modes:
            histogram = self.histograms.pop(name, None)
            if histogram is None:
                raise ValueError(f"layer {name} was not called on the calibration data; "
                                 f"activations={self.modes[name].name!r} needs its inputs observed")
            clip = self.observer.clip(histogram, self.percentile)
            self.calibrated[name] = self.modes[name].tensors_for_range(clip)
        return quantized

    def input_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The calibrated stored tensors of a solved layer (handed out once)."""
        return self.calibrated.pop(name)
