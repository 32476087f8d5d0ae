"""Result containers for evaluations, with JSON, `evaluate` and model-card (model-index) export."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import evaluate


@dataclass
class PerplexityResult:
    """Perplexity under one protocol (``"strided"`` or ``"gptq"``) and its parameters (max_length/stride/seqlen)."""

    ppl: float
    nll: float
    num_tokens: int
    protocol: str
    params: dict[str, int] = field(default_factory=dict)


@dataclass
class DriftResult:
    """Per-token KL(base || model) statistics and top-1 agreement of next-token distributions.

    ``mean_kl_stderr`` treats tokens as independent (llama.cpp's ``Mean KLD ± x``); tokens of one
    window are correlated, so ``mean_kl_stderr_windows`` takes per-window means as the independent
    units (noisy itself with few windows). Two rows whose mean KLs differ by less than about two
    standard errors are not separated by this evaluation.

    ``mean_delta_p`` (the mean change of the correct next token's probability, negative when the model
    got worse), ``ln_ppl_ratio`` / ``ppl_ratio`` (PPL(model) / PPL(base) on the same tokens) and their
    ``*_stderr`` are over the ``num_targets`` positions that have a next token in their window.
    """

    mean_kl: float
    p99_kl: float
    max_kl: float
    top1_agreement: float
    num_tokens: int
    mean_kl_stderr: float | None = None
    mean_kl_stderr_windows: float | None = None
    median_kl: float | None = None
    num_windows: int | None = None
    top1_agreement_stderr: float | None = None
    mean_delta_p: float | None = None
    mean_delta_p_stderr: float | None = None
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_stderr: float | None = None
    ppl_ratio: float | None = None
    ppl_ratio_stderr: float | None = None
    num_targets: int | None = None


@dataclass
class EvalReport:
    """Everything measured for one model configuration; ``perplexity`` is keyed by protocol.

    ``config`` is a short, JSON-serialisable summary of the quantization config (e.g. ``{"bits": 4}``).
    """

    model_id: str
    config: dict[str, Any] = field(default_factory=dict)
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    drift: DriftResult | None = None
    size_bytes: int | None = None
    bits_per_weight: float | None = None
    quantize_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path) -> Path:
        """Write the report as JSON to ``path`` and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        """Inverse of :meth:`to_dict`; keys starting with ``_`` (metadata added by ``evaluate.save``) are ignored."""
        values = {key: value for key, value in data.items() if not key.startswith("_")}
        values["perplexity"] = {
            protocol: PerplexityResult(**result) for protocol, result in values.get("perplexity", {}).items()
        }
        if values.get("drift") is not None:
            values["drift"] = DriftResult(**values["drift"])
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> EvalReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


def save_with_evaluate(report: EvalReport, save_dir: str | Path) -> Path:
    """Save the report with ``evaluate.save`` (adds timestamp, git commit, versions) into ``save_dir``.

    Returns the path of the written ``result-<timestamp>.json``; :meth:`EvalReport.from_json` reads it back.
    """
    return Path(evaluate.save(Path(save_dir), **report.to_dict()))


def model_index(
    report: EvalReport, model_name: str, dataset_name: str, dataset_type: str | None = None
) -> list[dict[str, Any]]:
    """Model-card ``model-index`` metadata with one perplexity metric per protocol in ``report``.

    ``dataset_type`` is the Hub dataset id (e.g. ``"wikitext"``); it defaults to ``dataset_name``.
    """
    if not report.perplexity:
        raise ValueError("report has no perplexity results to put in a model index")
    metrics = [
        {"type": "perplexity", "value": result.ppl, "name": _metric_name(result)}
        for result in report.perplexity.values()
    ]
    return [
        {
            "name": model_name,
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": dataset_name, "type": dataset_type or dataset_name},
                    "metrics": metrics,
                }
            ],
        }
    ]


def _metric_name(result: PerplexityResult) -> str:
    params = ", ".join(f"{key}={value}" for key, value in result.params.items())
    return f"Perplexity ({result.protocol}, {params})" if params else f"Perplexity ({result.protocol})"
