"""Output drift of a (quantized) model from its base model: KL divergence and top-1 agreement."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hfquant.evaluation.perplexity import (
    _check_context,
    _check_input_ids,
    _check_positive,
    _equal_length_batches,
    _evaluating,
    _progress_bar,
    _stack_windows,
    chunk_windows,
)
from hfquant.evaluation.results import DriftResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def drift(
    model: PreTrainedModel,
    base_model: PreTrainedModel,
    input_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    progress: bool = True,
) -> DriftResult:
    """KL(base || model) of next-token distributions and top-1 agreement, like llama.cpp's ``--kl-divergence``.

    Uses the non-overlapping ``seqlen`` windows of :func:`perplexity_gptq` (tail dropped) and every position of
    each window. KL is computed per token in float64 from ``log_softmax``; both models run window batch by
    window batch, so memory stays bounded.
    """
    _check_positive(seqlen=seqlen, batch_size=batch_size)
    _check_input_ids(input_ids, seqlen, "seqlen")
    _check_context(model, seqlen, "seqlen")
    _check_context(base_model, seqlen, "seqlen")

    windows = chunk_windows(len(input_ids), seqlen)
    kls, agreements, nll_gaps, delta_ps = [], [], [], []
    with _evaluating(model, base_model), _progress_bar(windows, "drift", progress) as bar:
        for batch in _equal_length_batches(windows, batch_size):
            ids = _stack_windows(input_ids, batch)
            logits = model(input_ids=ids.to(model.device), use_cache=False).logits
            base_logits = base_model(input_ids=ids.to(base_model.device), use_cache=False).logits
            if logits.shape[-1] != base_logits.shape[-1]:
                raise ValueError(
                    f"model and base_model vocabularies differ ({logits.shape[-1]} vs {base_logits.shape[-1]})"
                )
            for window_ids, window_logits, window_base_logits in zip(ids.to(logits.device), logits,
                                                                     base_logits.to(logits.device)):
                log_probs = window_logits.double().log_softmax(-1)
                base_log_probs = window_base_logits.double().log_softmax(-1)
                kls.append((base_log_probs.exp() * (base_log_probs - log_probs)).sum(-1).cpu())
                agreements.append((window_logits.argmax(-1) == window_base_logits.argmax(-1)).cpu())
                targets = window_ids[1:, None]  # the correct next token of every position but the last
                correct = log_probs[:-1].gather(-1, targets)[:, 0]
                base_correct = base_log_probs[:-1].gather(-1, targets)[:, 0]
                nll_gaps.append((base_correct - correct).cpu())  # nll(model) - nll(base), per token
                delta_ps.append((correct.exp() - base_correct.exp()).cpu())
            bar.update(len(batch))

    kl = torch.cat(kls)
    window_means = torch.stack([k.mean() for k in kls])
    agreement = torch.cat(agreements).double()
    nll_gap, delta_p = torch.cat(nll_gaps), torch.cat(delta_ps)
    log_ratio, log_ratio_stderr = nll_gap.mean().item(), _stderr(nll_gap)
    return DriftResult(
        mean_kl=kl.mean().item(),
        p99_kl=float(np.percentile(kl.numpy(), 99)),
        max_kl=kl.max().item(),
        top1_agreement=agreement.mean().item(),
        num_tokens=len(kl),
        mean_kl_stderr=_stderr(kl),
        mean_kl_stderr_windows=_stderr(window_means),
        median_kl=kl.median().item(),
        num_windows=len(kls),
        top1_agreement_stderr=_binomial_stderr(agreement),
        mean_delta_p=delta_p.mean().item(),
        mean_delta_p_stderr=_stderr(delta_p),
        ln_ppl_ratio=log_ratio,
        ln_ppl_ratio_stderr=log_ratio_stderr,
        ppl_ratio=float(np.exp(log_ratio)),
        ppl_ratio_stderr=None if log_ratio_stderr is None else float(np.exp(log_ratio)) * log_ratio_stderr,
        num_targets=len(nll_gap),
    )


def _binomial_stderr(hits: torch.Tensor) -> float | None:
    """Standard error of a rate, ``sqrt(p (1 - p) / (n - 1))`` (llama.cpp's for "Same top p")."""
    if len(hits) < 2:
        return None
    rate = hits.mean().item()
    return (rate * (1 - rate) / (len(hits) - 1)) ** 0.5


def _stderr(values: torch.Tensor) -> float | None:
    """Standard error of the mean of ``values`` (None for fewer than two)."""
    return (values.std() / len(values) ** 0.5).item() if len(values) > 1 else None
