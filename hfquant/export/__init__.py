"""Export hfquant models to the formats other runtimes load without ``import hfquant``.

``export(model_or_folder, out, to=...)`` writes the folder ``out`` atomically (staging folder and
renames, never over a folder hfquant did not write unless ``overwrite``), with a per-layer report
``hfquant-export.json``: each layer ``exact`` (the target decodes to hfquant's weight bit for bit,
measured) or ``re-quantized`` with the measured error. Formats a target cannot hold are refused
before anything is written, naming layer and format. Targets are registered in :data:`TARGETS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfquant.export.base import ExportReport, LayerExport, copy_side_files, load_source
from hfquant.export.compressed_tensors import export_compressed_tensors
from hfquant.export.gguf import export_gguf
from hfquant.hf.saving import write_folder_atomically
from hfquant.validation import require_bool


@dataclass(frozen=True)
class Target:
    """A runtime's format: how a loaded hfquant model is written into a staging folder."""

    name: str
    write: Callable[[Any, Path, ExportReport], None]
    consumer: str  # who loads it, for messages and docs
    side_files: bool = True  # copy the source folder's tokenizer and generation files (a GGUF file holds its own)


TARGETS = {target.name: target for target in (
    Target("compressed-tensors", export_compressed_tensors, "transformers' compressed-tensors loader, vLLM"),
    Target("gguf", export_gguf, "llama.cpp, transformers' GGUF loader", side_files=False),
)}


def export(model_or_folder: Any, out: str | os.PathLike, to: str = "compressed-tensors",
           overwrite: bool = False) -> ExportReport:
    """Export a quantized model (or a saved hfquant checkpoint folder) to the folder ``out`` for runtime ``to``."""
    if to not in TARGETS:
        raise ValueError(f"to={to!r} is not allowed; expected one of {list(TARGETS)}")
    require_bool("overwrite", overwrite)
    source_path = None if hasattr(model_or_folder, "named_modules") else model_or_folder
    from hfquant.hf.saving import check_output_folder

    check_output_folder(out, source_path, overwrite)  # before the (possibly long) load
    model, folder = load_source(model_or_folder)
    report = ExportReport(target=to, source=str(folder or getattr(model, "name_or_path", "")))

    def fill(staging: Path) -> None:
        TARGETS[to].write(model, staging, report)
        if TARGETS[to].side_files:
            report.files += copy_side_files(folder, staging)
        report.write(staging)

    write_folder_atomically(out, fill, source_path, overwrite)
    return report


__all__ = ["TARGETS", "ExportReport", "LayerExport", "Target", "export"]
