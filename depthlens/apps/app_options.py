"""Options and checks shared by the application commands (:mod:`depthlens.apps.cli_applications`,
:mod:`depthlens.apps.cli_depth`): every check here runs before a model loads.

- :func:`out_folder` / :func:`out_suffix`: ``--out`` as a folder (a name with a file suffix is
  refused) or, where a command says so, a picture file; :func:`~depthlens.apps.options.check_out`
  refuses a path that cannot be written;
- :func:`check_lenses`, :func:`readout_count`, :func:`load_readouts`: the ``--lens`` readouts;
- :func:`load_task_of`, :func:`warn_short`: ``--task`` with ``--limit``, ``--seed``, ``--cue``;
- :func:`add_common`: ``--model``, ``--lens``, ``--out``, ``--batch-size`` and the task options.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from depthlens.apps.options import add_lens, add_model, check_out, warn
from depthlens.errors import UsageError

PICTURE_SUFFIXES = (".png", ".pdf", ".svg", ".html")
"""Suffixes that make ``depth TEXT --out`` a picture file."""
FILE_SUFFIXES = (*PICTURE_SUFFIXES, ".csv", ".json", ".jsonl", ".txt", ".parquet")
"""Suffixes refused for an ``--out`` that must be a folder."""


def out_folder(args: argparse.Namespace, writes: str) -> Path:
    """``--out`` as the folder the command writes ``writes`` into, checked before any work."""
    suffix = out_suffix(args)
    if suffix in FILE_SUFFIXES:
        raise UsageError(f"--out {args.out}: {args.command} writes a folder ({writes}), not a {suffix} file; "
                         f"give a folder name, e.g. --out {Path(args.out).with_suffix('')}")
    return check_out(args.out, "folder")


def out_suffix(args: argparse.Namespace) -> str:
    """The lower-case suffix of ``--out``; an empty ``--out`` is refused."""
    if not args.out.strip():
        raise UsageError("--out is empty: give the output folder (or, for depth TEXT, a .png file)")
    return Path(args.out).suffix.lower()


def check_lenses(args: argparse.Namespace) -> None:
    """Refuse a ``--lens`` that names no readout (reads only config files)."""
    from depthlens.lenses.spec import readout_names

    readout_names(args.lens or [])


def readout_count(args: argparse.Namespace) -> int:
    """How many readouts a command runs: the logit lens and each distinct ``--lens``."""
    from depthlens.lenses.spec import readout_names

    return sum(path is not None for path in readout_names(args.lens or []).values()) + 1


def load_readouts(args: argparse.Namespace) -> tuple[Any, Any, dict]:
    """Model, tokenizer and the readouts: the logit lens and each ``--lens``, by readout name."""
    from depthlens.lenses.spec import load_lenses
    from depthlens.model.load import load_model

    check_lenses(args)
    model, tokenizer = load_model(args.model)
    lenses, _ = load_lenses(model, args.lens or [])
    return model, tokenizer, lenses


def load_task_of(args: argparse.Namespace, *, extra: int = 0) -> Any:
    """The :class:`~depthlens.analysis.applications.tasks.Task` of ``--task``: ``--limit`` (plus
    ``extra``) examples after a shuffle with ``--seed`` (default 0)."""
    from depthlens.analysis.applications.load import load_task

    wanted = None if args.limit is None else args.limit + extra
    return load_task(args.task, limit=wanted, seed=0 if args.seed is None else args.seed, cue=args.cue,
                     data_dir=args.data_dir)


def warn_short(args: argparse.Namespace, task: Any) -> None:
    """Warn when the task holds fewer examples than ``--limit`` asked for."""
    if args.limit is not None and len(task.examples) < args.limit:
        warn(f"--limit {args.limit}: task {task.name} has only {len(task.examples)} examples; using all of them")


TASK_HELP = "built-in task (depthlens tasks list), .jsonl/.parquet file of prompt/choices/gold rows, or hub name"
"""What ``--task`` accepts."""


def add_common(parser: argparse.ArgumentParser, out: str, *, task: bool = True, batch: int = 8) -> None:
    """``--model``, ``--lens`` (repeatable), ``--out`` (required, ``out`` says what goes there) and
    ``--batch-size`` (default ``batch``); with ``task``, also ``--limit``, ``--seed``, ``--cue`` and
    ``--data-dir``."""
    add_model(parser)
    add_lens(parser, repeatable=True, note="the logit lens is always used")
    parser.add_argument("--out", required=True, help=out)
    parser.add_argument("--batch-size", type=int, default=batch, help="prompts per forward pass (default %(default)s)")
    if task:
        parser.add_argument("--limit", type=int, help="use this many examples, drawn at random with --seed (default: "
                            "all, which takes minutes on a CPU: each example is run twice; see the README)")
        parser.add_argument("--seed", type=int, help="seed of the --limit draw and of the demonstrations (default 0)")
        parser.add_argument("--cue", help="the answer cue of the prompts (default: the task's, usually 'Answer:')")
        parser.add_argument("--data-dir", help="hf_datasets folder of the built-in tasks (default: see depthlens tasks list)")



__all__ = [
    "FILE_SUFFIXES", "PICTURE_SUFFIXES", "TASK_HELP", "add_common", "check_lenses", "load_readouts",
    "load_task_of", "out_folder", "out_suffix", "readout_count", "warn", "warn_short",
]
