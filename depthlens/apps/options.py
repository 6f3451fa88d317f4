"""The options every ``depthlens`` command shares, defined once, and the writers of its results.

- ``--model``: :data:`MODEL_HELP`, default :data:`depthlens.model.DEFAULT_MODEL`;
- ``--lens``: :data:`LENS_HELP` everywhere (read by :mod:`depthlens.lenses.registry`); a command
  adds what its default is and whether the option repeats;
- ``--layers``: :data:`LAYERS_HELP` everywhere, parsed by :func:`parse_layers` before any model
  loads and resolved against the model by :meth:`LayerSelection.resolve`;
- ``--out``: where results go; each command says what it writes there, and :func:`check_out`
  refuses a path that cannot be written before the work starts;
- ``--dtype``: :data:`DTYPE_CHOICES`, the precision of the products (default ``auto``);
- ``--data``: :data:`DATA_HELP` everywhere (:func:`add_data`); a command says what it reads of it;
- :func:`write_json` and :func:`write_csv`: atomic writes of a command's results;
- :func:`file_stem`: a readout's name made safe for a file name (``tuned (runs/a/lens)`` →
  ``tuned_runs_a_lens``).

This module imports nothing heavy, so building the parser (and ``depthlens --help``) stays fast.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthlens.atomic import write_file
from depthlens.errors import UsageError
from depthlens.model import DEFAULT_MODEL


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that names the command, the problem and where
    the options are explained (argparse's default prints the whole usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``PROG: error: MESSAGE (see PROG --help)`` to standard error and exit with 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


MODEL_HELP = f"built-in name ({DEFAULT_MODEL}, the default, or gemma3-270m), .gguf file, model folder or hub name"
"""What ``--model`` accepts."""
LENS_HELP = "logit, a lens folder of any registered kind, or a Hugging Face Hub lens hf:OWNER/NAME[/SUBFOLDER][@REVISION]"
"""What ``--lens`` accepts, in every command."""


DATA_HELP = ("mixed (the built-in corpus of many kinds of text, or one kind as mixed:KIND), shakespeare, "
             "a .txt/.jsonl/.parquet file, folder or glob, or a datasets name")
"""What ``--data`` accepts, in every command."""


def add_data(parser: argparse.ArgumentParser, default: str, use: str, *, columns: bool = False) -> None:
    """``--data SOURCE`` with :data:`DATA_HELP`; ``use`` says what the command reads of it. With
    ``columns``, also ``--column`` and ``--group-column`` for table-like sources."""
    parser.add_argument("--data", default=default, help=f"{DATA_HELP}; {use} (default: {default})")
    if columns:
        parser.add_argument("--column", help="text column of .jsonl/.parquet/datasets sources (default: text)")
        parser.add_argument("--group-column", help="column whose value keeps documents together in the train/validation "
                                                   "split, e.g. a book id; pass the one the lens was trained with "
                                                   "(default: split by document; shakespeare by play)")


def add_model(parser: argparse.ArgumentParser) -> None:
    """``--model SPEC``, default :data:`~depthlens.model.DEFAULT_MODEL`."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)


def add_lens(parser: argparse.ArgumentParser, default: str | None = "logit", *, repeatable: bool = False,
             note: str = "") -> None:
    """``--lens SPEC`` with :data:`LENS_HELP`; ``repeatable`` collects a list (``None`` if not
    given), and ``note`` says what the default means or what the lens is used for."""
    details = [note or (f"default: {default}" if default else ""), "repeatable" if repeatable else ""]
    extra = "; ".join(part for part in details if part)
    parser.add_argument("--lens", action="append" if repeatable else "store", default=None if repeatable else default,
                        metavar="LENS", help=LENS_HELP + (f" ({extra})" if extra else ""))


LAYERS_HELP = ("layers 0 … L (0 = the embeddings, L = the last block's output), comma-separated numbers and "
               "inclusive ranges START:END or START:END:STEP, e.g. 0,5,10 or 0:30:3 or 2,20:; a missing START is 0, "
               "a missing END is L")
"""What ``--layers`` accepts, in every command."""


@dataclass(frozen=True)
class LayerSelection:
    """A parsed ``--layers`` value: ``(start, end, step)`` ranges, inclusive of ``end`` (``None``
    for the last layer). :meth:`resolve` turns it into layer numbers once the model is known."""

    text: str
    option: str
    ranges: tuple[tuple[int, int | None, int], ...]

    def resolve(self, num_layers: int) -> list[int]:
        """The layers selected on a model of ``num_layers`` blocks, in the order written, each once.

        Raises :class:`~depthlens.errors.UsageError` for a layer outside ``0 … num_layers``.
        """
        for start, end, _ in self.ranges:
            top = start if end is None else end
            if top > num_layers:
                raise UsageError(f"{self.option} {self.text!r} names layer {top}, but this model has layers "
                                 f"0 … {num_layers}: pick layers between 0 and {num_layers}")
        return list(dict.fromkeys(layer for start, end, step in self.ranges
                                  for layer in range(start, (num_layers if end is None else end) + 1, step)))


def parse_layers(text: str | None, option: str = "--layers") -> LayerSelection | None:
    """Parse a ``--layers`` value (:data:`LAYERS_HELP`) before any model is loaded; ``None`` for
    none given. Raises :class:`~depthlens.errors.UsageError`, naming ``option``, for a piece that is
    not a layer or a range, a step below 1, and a range that selects nothing (``5:2``)."""
    if text is None:
        return None
    ranges = []
    for piece in (part.strip() for part in text.split(",")):
        bounds = piece.split(":")
        try:
            if not piece or len(bounds) > 3 or any(b.strip().startswith("-") for b in bounds):
                raise ValueError
            start = int(bounds[0]) if bounds[0].strip() else 0
            end = start if len(bounds) == 1 else int(bounds[1]) if bounds[1].strip() else None
            step = int(bounds[2]) if len(bounds) == 3 and bounds[2].strip() else 1
        except ValueError:
            raise UsageError(f"{option} {text!r}: {piece!r} is not a layer number or a START:END:STEP range; "
                             "write e.g. 0,5,10 or 0:30:3") from None
        if step < 1:
            raise UsageError(f"{option} {text!r}: the step of {piece!r} must be at least 1")
        if end is not None and end < start:
            raise UsageError(f"{option} {text!r}: {piece!r} selects no layer (ranges include both ends and go up: "
                             f"write {end}:{start})")
        ranges.append((start, end, step))
    return LayerSelection(text, option, tuple(ranges))


def add_layers(parser: argparse.ArgumentParser, note: str, *, option: str = "--layers") -> None:
    """``--layers`` (or ``option``) with :data:`LAYERS_HELP` and ``note`` (what the layers are for,
    and the default)."""
    parser.add_argument(option, help=f"{LAYERS_HELP} ({note})")


def add_out(parser: argparse.ArgumentParser, help: str, *, required: bool = False) -> None:
    """``--out PATH`` with the command's own ``help`` (what it writes there)."""
    parser.add_argument("--out", required=required, help=help)


def check_out(path: str | Path, kind: str = "folder", *, option: str = "--out") -> Path:
    """Refuse ``path`` (a ``"file"`` or a ``"folder"``) before any work if it clearly cannot be
    written: a file where a folder should be or the reverse, no permission in the nearest existing
    folder (or in the folder itself, if it exists). The :class:`~depthlens.errors.OutputError`
    names ``option``. Nothing is created."""
    import os

    from depthlens.atomic import check_output
    from depthlens.errors import OutputError

    try:
        target = check_output(path, kind)
    except OutputError as error:
        raise OutputError(f"{option}: {error}") from None
    if kind == "folder" and target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise OutputError(f"{option}: cannot write in the folder {target}: no permission; choose a folder you can write to")
    return target


def check_at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """Refuse, naming the option, a value below ``minimum`` among the options ``names`` of
    ``args`` (``None`` counts as not given)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def read_lines(path: str | Path, option: str) -> list[str]:
    """The non-blank lines of the UTF-8 text file ``path``, read before any model loads;
    :class:`~depthlens.errors.DataError` naming ``option`` for a missing, unreadable, non-UTF-8
    or blank file."""
    from depthlens.errors import DataError

    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise DataError(f"{option} {path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    except OSError as error:
        raise DataError(f"{option} {path}: cannot read it ({error.strerror or error}); give a UTF-8 text file, "
                        "one text per line") from None
    if not lines:
        raise DataError(f"{option} {path} holds no text: give a file with one text per line")
    return lines


def warn(message: str) -> None:
    """Print ``depthlens: warning: MESSAGE`` on standard error (a result that stands, with a caveat)."""
    import sys

    print(f"depthlens: warning: {message}", file=sys.stderr)


DTYPE_CHOICES = ("auto", "float32", "bfloat16")
"""What ``--dtype`` accepts: :data:`depthlens.model.precision.DTYPE_NAMES`, written out here so
that building the parser does not import torch."""


def add_dtype(parser: argparse.ArgumentParser) -> None:
    """``--dtype auto|float32|bfloat16``, default ``auto``
    (:func:`depthlens.model.precision.resolve_dtype`)."""
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="precision of the matrix products of the model's forward pass and the lens decoding: auto "
                             "(the default: bfloat16 where this CPU or GPU runs them fast, else float32), float32 or "
                             "bfloat16; statistics are float32 either way")


PLOTLYJS_CHOICES = ("directory", "inline", "cdn")
"""What ``--plotlyjs`` accepts: :data:`depthlens.viz.plotly_draw.PlotlyJs`, written out here so
that building the parser does not import plotly."""


def add_plotlyjs(parser: argparse.ArgumentParser) -> None:
    """``--plotlyjs directory|inline|cdn``, default ``directory``
    (:func:`depthlens.viz.plotly_draw.write_html`)."""
    parser.add_argument("--plotlyjs", choices=PLOTLYJS_CHOICES, default="directory",
                        help="where HTML pictures get plotly.js: directory (the default: one shared copy, about 4.8 MB, "
                             "written once beside the pages of the folder; they open offline while the folder stays "
                             "whole), inline (embedded in each page) or cdn (loaded from the web; blank offline)")


def write_json(path: str | Path, document: Any) -> Path:
    """Write ``document`` as indented UTF-8 JSON atomically (numpy and torch scalars as floats)."""
    return write_file(Path(path), (json.dumps(document, indent=2, default=float, ensure_ascii=False) + "\n").encode())


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as CSV atomically, one column per key in order of first appearance (a row
    without a key leaves its cell empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in rows for key in row)), restval="")
    writer.writeheader()
    writer.writerows(rows)
    return write_file(Path(path), buffer.getvalue().encode())


def file_stem(name: str) -> str:
    """``name`` with every character but letters, digits, ``-``, ``_`` and ``.`` made ``_``, runs
    of them merged: ``"tuned (runs/a/lens)"`` → ``"tuned_runs_a_lens"``."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return "_".join(part for part in stem.split("_") if part) or "_"


__all__ = ["DTYPE_CHOICES", "LAYERS_HELP", "LENS_HELP", "MODEL_HELP", "LayerSelection", "add_dtype", "add_layers", "add_lens", "add_model", "add_out", "check_at_least", "check_out", "file_stem", "parse_layers", "read_lines", "warn", "write_csv", "write_json"]
