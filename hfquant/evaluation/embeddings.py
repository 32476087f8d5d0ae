"""Sentence embeddings of an encoder and their drift under quantization.

:func:`sentence_embeddings` pools an encoder's last hidden state the way sentence-transformers does for
all-MiniLM-L6-v2 (``1_Pooling/config.json``: mean over the tokens the attention mask keeps, then the
``Normalize`` module: L2 norm). :func:`embedding_drift` compares a (quantized) model's embeddings with
its base model's on the same sentences: cosine similarity per sentence, and how well the pairwise
similarity matrix (what retrieval and clustering use) is preserved. :func:`test_sentences` gives real
sentences: the bundled Brown corpus's test split, split into sentences by a fixed rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from hfquant.evaluation.perplexity import _check_positive, _evaluating

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SPLITS = ("train", "validation", "test")

# Words that end with a period inside a sentence in 1961 American prose; a period after one of them (or
# after a single letter, or a dotted abbreviation such as "U.S") does not end a sentence.
ABBREVIATIONS = frozenset({
    "Adm", "Ave", "Bros", "Capt", "Cmdr", "Co", "Col", "Corp", "Dept", "Dr", "Ft", "Gen", "Gov", "Hon", "Inc",
    "Jr", "Lt", "Ltd", "Maj", "Messrs", "Mr", "Mrs", "Ms", "Mt", "No", "Nos", "Prof", "Pvt", "Rep", "Rev", "Sen",
    "Sgt", "Sr", "St", "Supt", "vs", "Vol", "Fig", "pp", "cf", "ca", "Jan", "Feb", "Mar", "Apr", "Aug", "Sept",
    "Sep", "Oct", "Nov", "Dec", "Ariz", "Calif", "Colo", "Conn", "Fla", "Ga", "Ill", "Ind", "Kan", "Ky", "La",
    "Mass", "Md", "Mich", "Minn", "Miss", "Mo", "Mont", "Neb", "Nev", "Okla", "Ore", "Pa", "Tenn", "Tex", "Va",
    "Vt", "Wash", "Wis", "Wyo",
})
# Candidate sentence end: terminal punctuation, closing quotes/brackets, whitespace, then what can open a
# sentence (capital letter or digit, possibly after opening quotes/brackets).
_BOUNDARY = re.compile(r"(?P<end>[.!?]+)[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")


@dataclass
class EmbeddingDrift:
    """How far a model's sentence embeddings moved from its base model's, on the same sentences.

    ``*_cosine``: cosine similarity of each sentence's embedding to the base model's (mean, min, 1st
    percentile). ``similarity_*``: agreement of the two pairwise cosine-similarity matrices over their
    upper triangles (distinct pairs): Pearson and Spearman correlation, mean absolute difference.
    """

    mean_cosine: float
    min_cosine: float
    p01_cosine: float
    similarity_pearson: float
    similarity_spearman: float
    similarity_mean_abs_diff: float
    num_sentences: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sentence_embeddings(
    model: PreTrainedModel,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings, float32 ``(len(sentences), hidden)`` on the CPU.

    Sentences are tokenized in batches of ``batch_size`` (padded to the batch's longest, truncated to
    ``max_length`` tokens, special tokens included); the model's ``last_hidden_state`` is averaged over the
    positions the attention mask keeps, in float32, and divided by its L2 norm (``F.normalize``, eps 1e-12,
    as sentence-transformers' ``Normalize``). Runs under ``torch.no_grad`` in eval mode.
    """
    _check_sentences(sentences)
    _check_positive(batch_size=batch_size, max_length=max_length)
    _check_max_length(model, max_length)
    if getattr(tokenizer, "pad_token", "") is None:
        raise ValueError("tokenizer has no pad_token; batched sentences need padding")
    pooled = []
    with _evaluating(model):
        for start in range(0, len(sentences), batch_size):
            batch = list(sentences[start : start + batch_size])
            encoded = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            outputs = model(**{key: value.to(model.device) for key, value in encoded.items()})
            hidden = getattr(outputs, "last_hidden_state", None)
            if hidden is None:
                raise ValueError(f"model ({type(model).__name__}) returns no last_hidden_state; "
                                 "pass a base encoder such as AutoModel.from_pretrained(...)")
            pooled.append(mean_pool(hidden, encoded["attention_mask"].to(hidden.device)).cpu())
    return F.normalize(torch.cat(pooled), p=2, dim=1, eps=1e-12)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Float32 mean of ``hidden`` ``(batch, tokens, dim)`` over the tokens where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    return (hidden.to(torch.float32) * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embedding_drift(
    model: PreTrainedModel,
    base_model: PreTrainedModel,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
) -> EmbeddingDrift:
    """:func:`compare_embeddings` of ``model``'s and ``base_model``'s :func:`sentence_embeddings` of ``sentences``."""
    _check_sentences(sentences, minimum=3)
    embeddings = sentence_embeddings(model, tokenizer, sentences, batch_size, max_length)
    base_embeddings = sentence_embeddings(base_model, tokenizer, sentences, batch_size, max_length)
    return compare_embeddings(embeddings, base_embeddings)


def compare_embeddings(embeddings: torch.Tensor, base_embeddings: torch.Tensor) -> EmbeddingDrift:
    """Per-sentence cosine and pairwise-similarity agreement of two ``(n, dim)`` embedding matrices, n >= 3.

    Computed in float64. Cosines use each row's own norm, so unnormalised inputs are fine. The
    correlations are NaN when one of the similarity triangles is constant.
    """
    for name, value in (("embeddings", embeddings), ("base_embeddings", base_embeddings)):
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating-point tensor (sentences, dim)")
        if len(value) < 3:
            raise ValueError(f"{name} has {len(value)} rows; pairwise-similarity agreement needs >= 3 sentences")
    if embeddings.shape != base_embeddings.shape:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} and base_embeddings "
                         f"{tuple(base_embeddings.shape)} differ in shape")
    ours = F.normalize(embeddings.detach().cpu().double(), dim=1)
    base = F.normalize(base_embeddings.detach().cpu().double(), dim=1)
    cosines = (ours * base).sum(1)
    rows, cols = torch.triu_indices(len(ours), len(ours), offset=1)
    similarities = (ours @ ours.T)[rows, cols]
    base_similarities = (base @ base.T)[rows, cols]
    return EmbeddingDrift(
        mean_cosine=cosines.mean().item(),
        min_cosine=cosines.min().item(),
        p01_cosine=float(np.percentile(cosines.numpy(), 1)),
        similarity_pearson=_pearson(similarities, base_similarities),
        similarity_spearman=_pearson(_average_ranks(similarities), _average_ranks(base_similarities)),
        similarity_mean_abs_diff=(similarities - base_similarities).abs().mean().item(),
        num_sentences=len(ours),
    )


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return (x @ y / denominator).item() if denominator > 0 else float("nan")


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based) of ``values``, ties sharing their average rank, as Spearman's rho uses."""
    order = torch.argsort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = ((ends - counts + ends - 1) / 2)[inverse]
    return ranks


def test_sentences(n: int, split: str = "test", min_words: int = 5) -> list[str]:
    """The first ``n`` sentences of ``split`` of the bundled Brown corpus with at least ``min_words`` words.

    Files in the split's order (sorted by file id, so the first sentences are news), paragraphs in order
    (``"\\n\\n"``-separated in :func:`hfquant.bundled.brown_corpus`), each split by :func:`split_sentences`;
    a word is a whitespace-separated token. ValueError when the split has fewer such sentences.
    """
    _check_positive(n=n, min_words=min_words)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; expected one of {list(SPLITS)}")
    from hfquant.bundled import brown_corpus

    sentences: list[str] = []
    for text in brown_corpus()[split]["text"]:
        for paragraph in text.split("\n\n"):
            sentences += [s for s in split_sentences(paragraph) if len(s.split()) >= min_words]
            if len(sentences) >= n:
                return sentences[:n]
    raise ValueError(f"n={n} is more than the {len(sentences)} sentences of >= {min_words} words in split {split!r}")


test_sentences.__test__ = False  # not a pytest test, whatever module imports it


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph of plain text into sentences, deterministically.

    A sentence ends at ``.``, ``!`` or ``?`` (with any closing quotes or brackets after it) followed by
    whitespace and a capital letter or digit (possibly after opening quotes or brackets). A single period
    after a word of :data:`ABBREVIATIONS` (also as the last part of a hyphenated word: ``ex-Gov.``), a
    single letter (an initial) or a dotted abbreviation (``U.S``) does not end a sentence; Brown's doubled
    period after an abbreviation (``Jr..``) does.
    """
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(paragraph):
        if match["end"] == "." and _is_abbreviation(paragraph[start : match.start()]):
            continue
        sentences.append(paragraph[start : match.end()].strip())
        start = match.end()
    tail = paragraph[start:].strip()
    return [*sentences, tail] if tail else sentences


def _is_abbreviation(text: str) -> bool:
    words = text.split()
    word = words[-1].rsplit("-", 1)[-1].lstrip("\"'([") if words else ""  # "ex-Gov" -> "Gov"
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or ("." in word and word[-1].isalpha())


def _check_sentences(sentences: Any, minimum: int = 1) -> None:
    if isinstance(sentences, str) or not isinstance(sentences, Sequence):
        raise ValueError("sentences must be a list of strings, not a single string or another type")
    if len(sentences) < minimum:
        raise ValueError(f"sentences has {len(sentences)} entries; at least {minimum} needed")
    bad = next((i for i, s in enumerate(sentences) if not isinstance(s, str) or not s.strip()), None)
    if bad is not None:
        raise ValueError(f"sentences[{bad}] is {sentences[bad]!r}; every sentence must be a non-empty string")


def _check_max_length(model: PreTrainedModel, max_length: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length ({max_length}) exceeds the model's max_position_embeddings ({limit})")
