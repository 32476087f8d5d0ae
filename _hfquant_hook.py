"""Imports hfquant just before transformers loads a checkpoint that declares ``quant_method="hfquant"``.

Installed (opt-in) by ``hfquant install-hook``, which writes a one-line ``.pth`` file into site-packages
that imports this module at interpreter start-up. It uses the standard library only and imports nothing
else: it puts a finder on ``sys.meta_path`` that waits for ``transformers.quantizers.auto`` to be
imported, then wraps that module's ``get_hf_quantizer`` (what ``from_pretrained`` calls to pick a
quantizer) so that a model config naming ``hfquant`` imports hfquant first, which registers it. Processes
that never load an hfquant checkpoint never import hfquant.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from typing import Any

WATCHED = "transformers.quantizers.auto"
QUANT_METHOD = "hfquant"


def declares_hfquant(config: Any) -> bool:
    """Whether a transformers model config carries an hfquant ``quantization_config``."""
    candidates = [config]
    if hasattr(config, "get_text_config"):
        candidates.append(config.get_text_config(decoder=True))
    for candidate in candidates:
        quantization = getattr(candidate, "quantization_config", None)
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", None)
        if str(getattr(method, "value", method)) == QUANT_METHOD:
            return True
    return False


def wrap_quantizer_lookup(module: Any) -> None:
    """Make ``module.get_hf_quantizer`` import hfquant first when the config declares it."""
    lookup = getattr(module, "get_hf_quantizer", None)
    if lookup is None or getattr(lookup, "_hfquant_hook", False):
        return

    @functools.wraps(lookup)
    def get_hf_quantizer(config: Any, *args: Any, **kwargs: Any) -> Any:
        if QUANT_METHOD not in sys.modules and declares_hfquant(config):
            import hfquant  # noqa: F401  (registers quant_method="hfquant" with transformers)
        return lookup(config, *args, **kwargs)

    get_hf_quantizer._hfquant_hook = True  # type: ignore[attr-defined]
    module.get_hf_quantizer = get_hf_quantizer


class QuantizerLookupFinder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` as usual, and wraps its lookup once it has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != WATCHED:
            return None
        sys.meta_path.remove(self)  # once only, and never in the way of the search below
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            wrap_quantizer_lookup(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Put the finder on ``sys.meta_path`` (or wrap the lookup at once if transformers has loaded it)."""
    if WATCHED in sys.modules:
        wrap_quantizer_lookup(sys.modules[WATCHED])
    elif not any(isinstance(finder, QuantizerLookupFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, QuantizerLookupFinder())


install()
