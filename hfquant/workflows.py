"""End-to-end jobs behind the CLI and the benchmarks: quantize, evaluate, compare."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from hfquant.algorithms import get_method
from hfquant.bundled import bundled_model_path
from hfquant.calibration.data import load_text
from hfquant.evaluation import (
    EvalReport,
    drift,
    markdown_table,
    perplexity_gptq,
    perplexity_strided,
    plot_ppl_vs_size,
    tokenize_corpus,
)
from hfquant.formats import parse_spec as parse_format_spec
from hfquant.hf.config import HfQuantConfig
from hfquant.stats import storage_stats

PROTOCOLS = ("gptq", "strided")


def resolve_model(model: str | os.PathLike | None) -> str:
    """A local folder or Hub id; ``None`` means the bundled SmolLM2-135M (built once into the cache).

    A ``model`` that can only be a local path (absolute, starting with ``.`` or ``~``, more than one
    ``/``) but is no folder raises ``FileNotFoundError`` (``NotADirectoryError`` for a file) naming it,
    instead of transformers' "Repo id must be in the form ..." for a Hub id.
    """
    if model is None:
        return str(bundled_model_path())
    text = os.fspath(model)
    if os.path.isdir(os.path.expanduser(text)):
        return text
    if os.path.exists(os.path.expanduser(text)):
        raise NotADirectoryError(f"MODEL={text!r} is a file; expected a model folder or a Hub id")
    if isinstance(model, os.PathLike) or os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"MODEL={text!r}: no such folder (and not a Hub id 'name' or 'namespace/name')")
    return text


def parse_spec(spec: str) -> dict[str, Any]:
    """``"[method:]format-spec"`` → HfQuantConfig keyword arguments, from the method and format registries.

    E.g. ``"int8"``, ``"int4-g128"``, ``"int3-gc-sym"`` (gc = per channel), ``"nf4-g64"``, ``"ternary"``,
    ``"gptq:int4-g128"``; see :func:`hfquant.formats.parse_spec` for the format part.
    """
    method, _, fmt = spec.strip().rpartition(":")
    kwargs: dict[str, Any] = {"format": parse_format_spec(fmt).to_dict()}
    if method:
        kwargs["method"] = get_method(method).name
    return kwargs


@dataclass
class EvalSettings:
    """What text to score and how. ``dataset=None`` is the bundled corpus (its test split)."""

    dataset: Any = None
    split: str = "test"
    protocols: tuple[str, ...] = PROTOCOLS
    seqlen: int = 2048
    stride: int = 512
    max_tokens: int | None = None
    batch_size: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown:
            raise ValueError(f"protocols={list(self.protocols)!r} has unknown {unknown}; allowed: {list(PROTOCOLS)}")
        if self.max_tokens is not None and self.max_tokens < self.seqlen:
            raise ValueError(f"max_tokens={self.max_tokens} is below seqlen={self.seqlen}; allowed: >= seqlen")


def eval_tokens(tokenizer: Any, settings: EvalSettings) -> torch.Tensor:
    """The evaluation split joined with blank lines and tokenized, cut to ``max_tokens``."""
    ids = tokenize_corpus(tokenizer, load_text(settings.dataset, split=settings.split))
    return ids if settings.max_tokens is None else ids[: settings.max_tokens]


def load(model: str | None, quant_kwargs: dict[str, Any] | None = None,
         device_map: str | None = None) -> tuple[PreTrainedModel, float]:
    """Load (and quantize, when ``quant_kwargs`` is given) a causal LM; returns it and the seconds taken.

    Without ``quant_kwargs`` no ``quantization_config`` is passed at all, so a saved hfquant checkpoint
    loads with the config in its ``config.json`` (passing ``None`` would drop it).
    """
    kwargs: dict[str, Any] = {"device_map": device_map}
    if quant_kwargs:
        kwargs["quantization_config"] = HfQuantConfig(**quant_kwargs)
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(resolve_model(model), **kwargs)
    return loaded.eval(), time.perf_counter() - start


def evaluate(model: PreTrainedModel, ids: torch.Tensor, settings: EvalSettings, model_id: str,
             config: dict[str, Any] | None = None, base: PreTrainedModel | None = None,
             quantize_seconds: float | None = None) -> EvalReport:
    """Perplexity under each protocol, drift from ``base`` when given, and storage figures."""
    report = EvalReport(model_id=model_id, config=config or {}, quantize_seconds=quantize_seconds)
    if "gptq" in settings.protocols:
        report.perplexity["gptq"] = perplexity_gptq(model, ids, settings.seqlen, settings.batch_size,
                                                    settings.progress)
    if "strided" in settings.protocols:
        report.perplexity["strided"] = perplexity_strided(model, ids, settings.seqlen, settings.stride,
                                                          settings.batch_size, settings.progress)
    if base is not None:
        report.drift = drift(model, base, ids, settings.seqlen, settings.batch_size, settings.progress)
    stats = storage_stats(model)
    report.size_bytes = stats.total_bytes
    report.bits_per_weight = stats.bits_per_weight if stats.quantized_layers else 8.0 * _float_element_size(model)
    return report


def _float_element_size(model: PreTrainedModel) -> int:
    return next(model.parameters()).element_size()


@dataclass
class Comparison:
    reports: list[EvalReport] = field(default_factory=list)
    table: str = ""


def compare(model: str | None, specs: list[str], settings: EvalSettings, out_dir: str | Path | None = None,
            quant_extra: dict[str, Any] | None = None,
            calibration_extra: dict[str, Any] | None = None) -> Comparison:
    """Evaluate the float model and each quantized configuration on the same tokens; table, plot, JSON.

    ``quant_extra`` (e.g. ``rules``) goes to every spec's HfQuantConfig, ``calibration_extra`` (dataset,
    num_samples, seqlen, seed) to those of calibrated methods only.
    """
    path = resolve_model(model)
    base, _ = load(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = eval_tokens(tokenizer, settings)
    result = Comparison([evaluate(base, ids, settings, model_id=path, config={"format": "float"})])
    for spec in specs:
        kwargs = {**parse_spec(spec), **(quant_extra or {})}
        if HfQuantConfig(**kwargs).calibrated:  # a calibrated method, target_bits or smoothquant
            kwargs.update(calibration_extra or {})
        quantized, seconds = load(path, kwargs)
        result.reports.append(evaluate(quantized, ids, settings, model_id=path, config={"format": spec},
                                       base=base, quantize_seconds=seconds))
        del quantized
    result.table = markdown_table(result.reports, baseline=result.reports[0])
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(result.table)
        plot_ppl_vs_size(result.reports, out / "ppl_vs_size.png")
        for report in result.reports:
            report.to_json(out / f"{report.config['format'].replace(':', '_')}.json")
    return result
