"""Saving quantized models: atomic folders and a model card next to the weights."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from hfquant.cards import render_card, write_card
from hfquant.evaluation.results import EvalReport
from hfquant.stats import storage_stats


def card_for(model: PreTrainedModel, folder: str | Path, report: EvalReport | None = None) -> Any:
    """The model card of a quantized ``model`` that is (being) saved to ``folder``."""
    quant_config = model.config.quantization_config
    quant_dict = quant_config if isinstance(quant_config, dict) else quant_config.to_dict()
    return render_card(quant_dict, base_model=quant_dict.get("base_model"), model_name=Path(folder).name,
                       repo_or_path=str(folder), storage=storage_stats(model).to_dict(), report=report)


def save_pretrained_with_card(model: PreTrainedModel, save: Callable[..., Any], save_directory: str | os.PathLike,
                              *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` that also writes ``README.md`` (unless the folder already has one)."""
    result = save(save_directory, *args, **kwargs)
    still_quantized = getattr(model.config, "quantization_config", None) is not None  # not after dequantize()
    if still_quantized and not (Path(save_directory) / "README.md").exists():
        write_card(card_for(model, save_directory), save_directory)
    return result


def save_quantized(model: PreTrainedModel, folder: str | Path, tokenizer: Any = None,
                   report: EvalReport | None = None) -> Path:
    """Save weights, config, tokenizer and model card into ``folder`` atomically.

    Everything is written to a temporary sibling folder first and renamed into place, so ``folder``
    is never left half-written; an existing ``folder`` is replaced only after the new one is complete.
    """
    folder = Path(folder).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        type(model).save_pretrained(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_card(card_for(model, folder, report), staging)
        _replace_dir(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _replace_dir(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
