"""Evaluation harness: perplexity (HF strided and GPTQ protocols), drift from a base model, and reports."""

from hfquant.evaluation.drift import drift
from hfquant.evaluation.embeddings import (
    EmbeddingDrift,
    compare_embeddings,
    embedding_drift,
    sentence_embeddings,
    test_sentences,
)
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
    "EmbeddingDrift",
    "EvalReport",
    "PerplexityResult",
    "compare_embeddings",
    "drift",
    "embedding_drift",
    "markdown_table",
    "model_index",
    "perplexity_gptq",
    "perplexity_strided",
    "plot_ppl_vs_size",
    "save_with_evaluate",
    "sentence_embeddings",
    "test_sentences",
    "tokenize_corpus",
]
