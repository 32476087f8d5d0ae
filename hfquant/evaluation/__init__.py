"""Evaluation harness: perplexity (HF strided and GPTQ protocols), drift from a base model, and reports."""

from hfquant.evaluation.drift import drift
from hfquant.evaluation.perplexity import perplexity_gptq, perplexity_strided, tokenize_corpus
from hfquant.evaluation.report import markdown_table, plot_ppl_vs_size
from hfquant.evaluation.results import (
    DriftResult,
    EvalReport,
    PerplexityResult,
    model_index,
    save_with_evaluate,
)

__all__ = [
    "DriftResult",
    "EvalReport",
    "PerplexityResult",
    "drift",
    "markdown_table",
    "model_index",
    "perplexity_gptq",
    "perplexity_strided",
    "plot_ppl_vs_size",
    "save_with_evaluate",
    "tokenize_corpus",
]
