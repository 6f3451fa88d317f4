"""Task data: multiple-choice examples (a prompt, answer choices, the gold index).

Classification is the same thing with the label words as choices (SST-2: ``" negative"``,
``" positive"``). A choice is scored as the continuation of its prompt, so it carries its own
leading space. A :class:`Task` also knows its **answer cue** (``"Answer:"``), the text before which
prompt injections go.

Sources (:func:`~depthlens.analysis.applications.load.load_task`):

- a local ``.jsonl`` / ``.parquet`` file with fields ``prompt`` (string), ``choices`` (list of
  strings), ``gold`` (0-based index) and optionally ``id``;
- a built-in offline task by name (``sst2``, ``boolq``, ``arc_easy``, …), see
  :mod:`depthlens.analysis.applications.builtin`;
- a ``datasets`` hub name (online) whose rows have the same fields.

Every example is checked; bad data raises a one-line :class:`~depthlens.errors.TaskError` that
names the example (file and line, or task and index) and what to fix.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from depthlens.errors import TaskError

DEFAULT_CUE = "Answer:"
"""The answer cue of a task unless it says otherwise."""
DEMO_SEPARATOR = "\n\n"
"""What separates few-shot demonstrations from each other and from the prompt."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice example: ``choices[gold]`` is the right continuation of ``prompt``."""

    prompt: str
    choices: tuple[str, ...]
    gold: int
    id: str = ""


@dataclass(frozen=True)
class Task:
    """A named list of examples with the same number of choices, and the answer cue of its prompts."""

    name: str
    examples: tuple[Example, ...]
    cue: str | None = DEFAULT_CUE
    notes: tuple[str, ...] = field(default=())

    @property
    def num_choices(self) -> int:
        """How many choices every example has."""
        return len(self.examples[0].choices)

    def head(self, limit: int | None, *, seed: int | None = None) -> Task:
        """The first ``limit`` examples (all if ``None``), after a seeded shuffle if ``seed`` is set."""
        examples = list(self.examples)
        if seed is not None:
            random.Random(seed).shuffle(examples)
        return replace(self, examples=tuple(examples[:limit] if limit is not None else examples))


def check_example(row: Mapping[str, Any], where: str) -> Example:
    """``row`` (fields ``prompt``, ``choices``, ``gold``, optional ``id``) as an :class:`Example`;
    :class:`TaskError` naming ``where`` if a field is missing or wrong."""
    if not isinstance(row, Mapping):
        raise TaskError(f"{where}: an example must be an object with prompt, choices and gold, got {type(row).__name__}")
    missing = [name for name in ("prompt", "choices", "gold") if name not in row or row[name] is None]
    if missing:
        raise TaskError(f"{where}: missing field {', '.join(missing)}; every example needs prompt, choices and gold")
    prompt, choices, gold = row["prompt"], row["choices"], row["gold"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise TaskError(f"{where}: the prompt must be a non-empty string")
    if isinstance(choices, str) or not isinstance(choices, Sequence) and not hasattr(choices, "tolist"):
        raise TaskError(f"{where}: choices must be a list of strings, got {type(choices).__name__}")
    choices = tuple(choices.tolist() if hasattr(choices, "tolist") else choices)
    if not choices:
        raise TaskError(f"{where}: the choice list is empty; give at least two choices")
    if any(not isinstance(c, str) or not c.strip() for c in choices):
        raise TaskError(f"{where}: every choice must be a non-empty string")
    if isinstance(gold, bool) or not isinstance(gold, numbers.Integral):
        raise TaskError(f"{where}: gold must be the 0-based index of the right choice, got {gold!r}")
    gold = int(gold)
    if not 0 <= gold < len(choices):
        raise TaskError(f"{where}: gold index {gold} is out of range for {len(choices)} choices (0 … {len(choices) - 1})")
    return Example(prompt, choices, gold, str(row.get("id") or ""))


def make_task(name: str, examples: Iterable[Example], places: Sequence[str] | None = None, *,
              cue: str | None = DEFAULT_CUE, notes: Sequence[str] = ()) -> Task:
    """A :class:`Task` of ``examples``; :class:`TaskError` if there are none or their choice
    counts differ (``places`` name the examples in that message)."""
    examples = tuple(examples)
    if not examples:
        raise TaskError(f"task {name} has no examples: give a file or task with at least one")
    first = len(examples[0].choices)
    for index, example in enumerate(examples):
        if len(example.choices) != first:
            where = places[index] if places else f"{name} example {index}"
            raise TaskError(
                f"{where}: has {len(example.choices)} choices but the first example has {first}; "
                "every example of a task needs the same number of choices"
            )
    if first < 2:
        raise TaskError(f"task {name}: examples have {first} choice; give at least two")
    return Task(name, examples, cue, tuple(notes))


def read_task_file(path: str | os.PathLike, *, cue: str | None = DEFAULT_CUE) -> Task:
    """A task from a ``.jsonl`` or ``.parquet`` file of examples (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"task file {os.fspath(path)!r} does not exist: give a .jsonl or .parquet file")
    rows, places = [], []
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise TaskError(f"{path}:{number}: not valid JSON ({error.msg}); write one object per line") from None
                places.append(f"{path}:{number}")
    elif path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        places = [f"{path} row {i}" for i in range(len(rows))]
    else:
        raise TaskError(f"task file {os.fspath(path)!r}: the name must end in .jsonl or .parquet")
    examples = [check_example(row, where) for row, where in zip(rows, places)]
    return make_task(path.stem, examples, places, cue=cue)


def read_hub_task(name: str, *, config: str | None = None, split: str = "validation",
                  cue: str | None = DEFAULT_CUE) -> Task:
    """A task from a ``datasets`` hub dataset (online) whose rows have prompt, choices, gold."""
    quiet = [logging.getLogger(library) for library in ("datasets", "huggingface_hub")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # their retry notices would add lines to the one-line error below
        logger.setLevel(logging.ERROR)
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot load"
        raise TaskError(f"cannot load hub dataset {name!r} ({type(error).__name__}: {str(error)[:120]}); "
                        "check the name and the network, or pass a local .jsonl file") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    places = [f"{name}[{split}] row {i}" for i in range(len(rows))]
    return make_task(name, [check_example(row, where) for row, where in zip(rows, places)], places, cue=cue)


def demonstration(example: Example, shift: int = 0) -> str:
    """``example`` written out with an answer: its prompt and choice ``(gold + shift) mod n``
    (``shift = 0``: the right one; else a permuted label)."""
    return example.prompt + example.choices[(example.gold + shift) % len(example.choices)]


def few_shot(task: Task, shots: int, *, shift: int = 0, seed: int = 0, limit: int | None = None) -> Task:
    """Few-shot prompts: each evaluated example gets ``shots`` demonstrations drawn (with
    ``seed``) from the examples not evaluated, answered with label ``gold + shift mod n``.

    The first ``limit`` examples (default: all but ``shots``) are evaluated; the same ``seed``
    draws the same demonstrations for every ``shift``, so prompts differ only in their labels."""
    count = len(task.examples) - shots if limit is None else limit
    if shots < 0 or count < 1 or count + shots > len(task.examples):
        raise TaskError(f"task {task.name} has {len(task.examples)} examples: too few for {shots} demonstrations "
                        f"and {count} evaluated examples; lower --shots or --limit")
    evaluated, pool = task.examples[:count], task.examples[count:]
    rng = random.Random(seed)
    examples = []
    for example in evaluated:
        demos = [demonstration(demo, shift) for demo in rng.sample(pool, shots)]
        examples.append(replace(example, prompt=DEMO_SEPARATOR.join([*demos, example.prompt])))
    note = f"{shots}-shot, demonstration labels shifted by {shift}" if shift else f"{shots}-shot"
    return replace(task, examples=tuple(examples), notes=(*task.notes, note))


__all__ = [
    "DEFAULT_CUE", "DEMO_SEPARATOR", "Example", "Task", "check_example", "demonstration", "few_shot",
    "make_task", "read_hub_task", "read_task_file",
]
