"""Load a task by name: a local ``.jsonl``/``.parquet`` file, a built-in offline task, or a
``datasets`` hub name (see :mod:`~depthlens.analysis.applications.tasks` for the format)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from depthlens.analysis.applications.builtin import BUILTIN_TASKS, builtin_task
from depthlens.analysis.applications.tasks import Task, read_hub_task, read_task_file
from depthlens.errors import TaskError


def load_task(spec: str | os.PathLike, *, limit: int | None = None, seed: int | None = 0,
              cue: str | None = None, split: str = "validation", data_dir: str | os.PathLike | None = None) -> Task:
    """The task ``spec`` names: a local file, a built-in task name, or a ``datasets`` hub name.

    ``limit`` keeps that many examples after a shuffle with ``seed`` (``None``: file order);
    ``cue`` overrides the task's answer cue; ``data_dir`` is where built-in task files live
    (default: see :func:`~depthlens.analysis.applications.builtin.task_data_dir`)."""
    text = os.fspath(spec)
    if text in BUILTIN_TASKS:
        task = builtin_task(text, data_dir=data_dir)
    elif text.lower().endswith((".jsonl", ".parquet")) or Path(text).expanduser().exists():
        task = read_task_file(text)
    elif "/" in text:
        task = read_hub_task(text, split=split)
    else:
        raise TaskError(f"unknown task {text!r}: give a built-in task ({', '.join(BUILTIN_TASKS)}), "
                        "a .jsonl/.parquet file, or a datasets hub name owner/name")
    if cue is not None:
        task = replace(task, cue=cue)
    return task.head(limit, seed=seed)


__all__ = ["load_task"]
