"""Perplexity of causal language models under the HF strided and the GPTQ-paper protocols."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hfquant.evaluation.results import PerplexityResult

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel


class Window(NamedTuple):
    """Token span ``[begin, end)`` of the corpus whose last ``target_len`` tokens are scored."""

    begin: int
    end: int
    target_len: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def tokenize_corpus(
    tokenizer,
    texts: list[str] | datasets.Dataset,
    text_column: str = "text",
    joiner: str = "\n\n",
) -> torch.Tensor:
    """Join ``texts`` (or ``texts[text_column]`` of a dataset) with ``joiner`` and tokenize into a 1-D LongTensor."""
    if not isinstance(texts, list):
        texts = list(texts[text_column])
    if not texts:
        raise ValueError("texts must not be empty")
    return tokenizer(joiner.join(texts), return_tensors="pt")["input_ids"][0]


def perplexity_strided(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    max_length: int,
    stride: int,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity with the sliding-window protocol of the HF docs ("Perplexity of fixed-length models").

    Windows of ``max_length`` tokens start every ``stride`` tokens; only the tokens not already scored by a
    previous window (the last ``trg_len`` of each window, the rest labelled -100) are scored, each with its
    in-window prefix as context. The first token of a window is never scored (it has no context), as in HF's
    shifted loss. The NLL is the exact per-token mean (sum of token NLLs / number of scored tokens); the docs
    instead weight each window's mean loss by ``num_valid_tokens - batch_size`` (older versions: average the
    window means), which miscounts by one token in every window after the first when ``stride < max_length``.
    """
    _check_positive(max_length=max_length, stride=stride, batch_size=batch_size)
    if stride > max_length:
        raise ValueError(f"stride ({stride}) must not exceed max_length ({max_length})")
    _check_input_ids(input_ids, max_length, "max_length")
    _check_context(model, max_length, "max_length")

    windows = strided_windows(len(input_ids), max_length, stride)
    nlls = torch.cat(_window_nlls(model, input_ids, windows, batch_size, progress, "perplexity (strided)"))
    nll = nlls.mean().item()
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        num_tokens=len(nlls),
        protocol="strided",
        params={"max_length": max_length, "stride": stride},
    )


def perplexity_gptq(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity with the GPTQ-paper protocol (IST-DASLab/gptq ``llama_eval``).

    ``input_ids`` is the test split joined with "\\n\\n" and tokenized (see :func:`tokenize_corpus`). It is cut
    into non-overlapping windows of ``seqlen`` tokens (the tail is dropped), every window is scored fully (all
    tokens but the first), and ``ppl = exp(sum(window_mean_nll * seqlen) / (nsamples * seqlen))``.
    """
    _check_positive(seqlen=seqlen, batch_size=batch_size)
    _check_input_ids(input_ids, seqlen, "seqlen")
    _check_context(model, seqlen, "seqlen")

    windows = chunk_windows(len(input_ids), seqlen)
    window_nlls = _window_nlls(model, input_ids, windows, batch_size, progress, "perplexity (gptq)")
    nll = (torch.stack([w.mean() for w in window_nlls]) * seqlen).sum().item() / (len(windows) * seqlen)
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        num_tokens=sum(len(w) for w in window_nlls),
        protocol="gptq",
        params={"seqlen": seqlen},
    )


def strided_windows(seq_len: int, max_length: int, stride: int) -> list[Window]:
    """Windows of the HF strided protocol, each scoring the tokens past the previous window's end."""
    windows = []
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == seq_len:
            break
    return windows


def chunk_windows(seq_len: int, seqlen: int) -> list[Window]:
    """Non-overlapping, fully scored windows of ``seqlen`` tokens; the tail shorter than ``seqlen`` is dropped."""
    return [Window(start, start + seqlen, seqlen) for start in range(0, seq_len - seqlen + 1, seqlen)]


def _window_nlls(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    windows: Sequence[Window],
    batch_size: int,
    progress: bool,
    desc: str,
) -> list[torch.Tensor]:
    """Float64 NLLs (on CPU) of the scored tokens of each window, running equal-length windows in batches."""
    nlls = []
    with _evaluating(model), _progress_bar(windows, desc, progress) as bar:
        for batch in _equal_length_batches(windows, batch_size):
            ids = _stack_windows(input_ids, batch).to(model.device)
            logits = model(input_ids=ids, use_cache=False).logits
            for window, window_ids, window_logits in zip(batch, ids, logits):
                first = max(window.length - window.target_len, 1)
                scores = window_logits[first - 1 : -1].to(torch.promote_types(logits.dtype, torch.float32))
                nlls.append(F.cross_entropy(scores, window_ids[first:], reduction="none").double().cpu())
            bar.update(len(batch))
    return nlls


def _equal_length_batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Group consecutive windows of equal length into batches of at most ``batch_size``."""
    batch: list[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or batch[0].length != window.length):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def _stack_windows(input_ids: torch.Tensor, windows: Sequence[Window]) -> torch.Tensor:
    return torch.stack([input_ids[w.begin : w.end] for w in windows])


def _progress_bar(windows: Sequence[Window], desc: str, progress: bool) -> tqdm:
    return tqdm(total=len(windows), desc=desc, unit="window", disable=not progress)


@contextmanager
def _evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """Run under ``torch.no_grad`` with ``models`` in eval mode; restore their previous modes afterwards.

    Not ``inference_mode``: some quantized layers of other libraries (optimum-quanto int4) fail on
    inference tensors, and a base model given for comparison may be one of them.
    """
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for model, training in zip(models, was_training):
            model.train(training)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_input_ids(input_ids: torch.Tensor, window: int, window_name: str) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 1 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a 1-D LongTensor of token ids")
    if len(input_ids) < window:
        raise ValueError(f"input_ids has {len(input_ids)} tokens, shorter than one window ({window_name}={window})")


def _check_context(model: PreTrainedModel, window: int, window_name: str) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and window > limit:
        raise ValueError(f"{window_name} ({window}) exceeds the model's max_position_embeddings ({limit})")
