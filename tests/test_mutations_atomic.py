"""Single files are written atomically: a reader never sees a half-written file, and a failed
write leaves the old file as it was. A plain ``write_bytes`` fails these (it truncates the file
in place, then writes into the same inode)."""

from __future__ import annotations

import os
import resource
import signal

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from depthlens import LogitLens
from depthlens.analysis.evaluate import evaluate
from depthlens.analysis.trajectory import Trajectory
from depthlens.atomic import write_file
from depthlens.errors import OutputError
from depthlens.viz.pictures import save_figure
from depthlens.viz.plotly_draw import bundle_name
from depthlens.viz.report import write_report


def test_write_file_replaces_the_file_instead_of_rewriting_it(tmp_path):
    """A reader that opened the old file (here: a hard link to it) keeps the complete old
    content; the path then names a new, complete file."""
    target = tmp_path / "eval.json"
    target.write_bytes(b"old content")
    reader = tmp_path / "held-open"
    os.link(target, reader)
    write_file(target, b"new")
    assert reader.read_bytes() == b"old content"
    assert target.read_bytes() == b"new" and not os.path.samefile(target, reader)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "held-open"]


def _write_on_a_full_disk(target, data: bytes) -> str:
    """Write ``data`` to ``target`` in a forked child whose files cannot grow past 4 kB (as on a
    full disk); returns what happened: ``"OutputError: …"``, ``"wrote"`` or another error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery past this point
        os.close(read_end)
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            try:
                write_file(target, data)
                outcome = "wrote"
            except OutputError as error:
                outcome = f"OutputError: {error}"
            except BaseException as error:  # noqa: BLE001 - reported to the parent
                outcome = f"{type(error).__name__}: {error}"
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_a_write_that_fails_half_way_leaves_the_old_file(tmp_path):
    """The file-size limit makes the disk 'full' after 4 kB: the write fails with a clear error,
    the old file is untouched and no partial file is left beside it."""
    target = tmp_path / "curves.html"
    target.write_bytes(b"<html>old</html>")
    outcome = _write_on_a_full_disk(target, b"x" * 100_000)
    assert outcome.startswith("OutputError: cannot write the file") and str(target) in outcome, outcome
    assert target.read_bytes() == b"<html>old</html>"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.html"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _linked(folder):
    """Hard links to every file in ``folder``, as a reader holding them open would see them."""
    links = {}
    for path in sorted(folder.iterdir()):
        link = folder.parent / f"link-{path.name}"
        os.link(path, link)
        links[path] = (link, path.read_bytes())
    return links


def test_evaluation_files_are_replaced_atomically(model, tmp_path):
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randint(0, VOCAB, (8,), generator=generator) for _ in range(8)]
    first = evaluate(model, {"logit": LogitLens(model)}, chunks, [10] * 8, groups=8, resamples=20, progress=False)
    second = evaluate(model, {"logit": LogitLens(model)}, chunks[:4] * 2, [10] * 8, groups=8, resamples=20,
                      progress=False)
    files = write_report(first, tmp_path / "eval")
    assert {p.suffix for p in files.values()} == {".json", ".csv", ".html", ".png"}
    links = _linked(tmp_path / "eval")
    write_report(second, tmp_path / "eval")
    for path, (link, before) in links.items():
        assert link.read_bytes() == before, f"{path.name} was rewritten in place"
        assert not os.path.samefile(path, link), path.name


@pytest.mark.parametrize("suffix", ["csv", "html", "png"])
def test_figures_and_tables_are_replaced_atomically(model, tiny_tokenizer, tmp_path, suffix):
    trajectory = Trajectory.from_text(model, tiny_tokenizer, LogitLens(model), "Fair is foul")
    path = tmp_path / "out" / f"figure.{suffix}"
    path.parent.mkdir()
    path.write_bytes(b"old")
    link = tmp_path / "link"
    os.link(path, link)
    save_figure([trajectory], path, stat="kl")
    assert link.read_bytes() == b"old" and path.read_bytes() != b"old"
    shared = [bundle_name()] if suffix == "html" else []  # the folder's one plotly.js copy
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, *shared])
