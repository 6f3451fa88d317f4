"""``depthlens app``: the web app's requests over loopback HTTP, its limits, 50 concurrent
requests, and the command that starts it; on a tiny model."""

from __future__ import annotations

import contextlib
import html
import inspect
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from depthlens import LogitLens, TunedLens
from depthlens.analysis.evaluate import evaluate
from depthlens.analysis.trajectory import LABEL_CHARS, Trajectory, shorten
from depthlens.apps.cli import build_parser, main
from depthlens.apps.web import (
    AppError,
    Explorer,
    build_app,
    load_lenses,
    serve,
    start,
    write_downloads,
)
from depthlens.errors import LensFileError
from depthlens.text.tokens import token_label
from depthlens.viz.report import write_report

TEXT = "Fair is foul, and foul is fair"
MAX_TOKENS = 16




def make_run(tmp: Path, tokenizer) -> Path:
    """A tiny model saved in ``tmp/model`` and a run folder ``tmp/run`` as ``depthlens train``
    leaves it: a tuned lens in ``lens/`` and its evaluation in ``eval/``."""
    model = tiny_model("llama")
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    lens = TunedLens(model)
    with torch.no_grad():
        for translator in lens.translators:
            translator.bias.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    lens.save_pretrained(tmp / "run" / "lens")
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randint(0, VOCAB, (12,), generator=generator) for _ in range(6)]
    report = evaluate(model, {"logit": LogitLens(model), "tuned": lens}, chunks, [30] * 6,
                      batch_size=6, groups=3, resamples=50, progress=False)
    write_report(report, tmp / "run" / "eval")
    return tmp / "run"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(model, tokenizer, lens_dirs, cache: Path, **options) -> Iterator[str]:
    """The app for ``model`` with the logit lens and ``lens_dirs``, served on a free loopback
    port while the block runs, with Gradio's file cache in ``cache``; yields its URL."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(cache))
        lenses, eval_dirs = load_lenses(model, lens_dirs)
        demo = build_app(model, tokenizer, lenses, eval_dirs, max_tokens=MAX_TOKENS, **options)
        url = start(demo, "127.0.0.1", free_port(), quiet=True)
        try:
            yield url
        finally:
            demo.close()


def call(url: str, endpoint: str, data: list, timeout: float = 30.0) -> tuple[str, object]:
    """Ask the app's HTTP API for ``endpoint`` with ``data``; returns the final event's name
    (``complete`` or ``error``) and its data."""
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        posted = client.post(f"{url}gradio_api/call/{endpoint}", json={"data": data})
        posted.raise_for_status()
        answer = client.get(f"{url}gradio_api/call/{endpoint}/{posted.json()['event_id']}")
        answer.raise_for_status()
    blocks = [dict(line.split(": ", 1) for line in block.splitlines()) for block in answer.text.split("\n\n") if block.strip()]
    final = next(block for block in reversed(blocks) if block.get("event") in ("complete", "error"))
    return final["event"], json.loads(final["data"])


def heatmap_labels(plot: dict) -> list[list[list[str]]]:
    """The cell labels of each labelled heatmap in a plot as the app returns it."""
    figure = json.loads(plot["plot"])
    return [trace["text"] for trace in figure["data"] if trace["type"] == "heatmap" and trace.get("text")]


def expected_labels(model, tokenizer, lens, text: str) -> list[list[str]]:
    """The top-1 labels the heatmap should show, computed directly with the library."""
    trajectory = Trajectory.from_text(model, tokenizer, lens, text)
    return [[html.escape(label, quote=False) for label in row] for row in trajectory.top1_labels(max_chars=8)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_run(tmp_path_factory.mktemp("app"), tiny_tokenizer)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def url(model, tiny_tokenizer, run, tmp_path_factory) -> Iterator[str]:
    with running_app(model, tiny_tokenizer, [run / "lens"], tmp_path_factory.mktemp("gradio")) as address:
        yield address


@pytest.fixture(scope="module")
def tuned(model, run) -> TunedLens:
    return TunedLens.from_pretrained(run / "lens", model)


def test_the_command_binds_to_loopback_by_default():
    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.model, args.lens) == ("127.0.0.1", 7860, "smollm2-135m", None)
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(start).parameters["host"].default == "127.0.0.1"


def test_the_command_passes_its_options_to_serve(monkeypatch):
    seen = {}
    monkeypatch.setattr("depthlens.apps.web.serve", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    assert main(["app", "--model", "m", "--lens", "a", "--lens", "b", "--host", "::1", "--port", "9000", "--max-tokens", "8"]) == 0
    assert seen == {"args": ("m", ["a", "b"]), "kwargs": {"host": "::1", "port": 9000, "max_tokens": 8}}


def test_lenses_and_evaluations_are_found_next_to_each_other(model, run, tmp_path):
    lenses, eval_dirs = load_lenses(model, [run / "lens", "logit"])
    assert list(lenses) == ["logit", "tuned"] and eval_dirs == {"tuned": run / "eval"}
    shutil.copytree(run / "lens", tmp_path / "copy")
    lenses, eval_dirs = load_lenses(model, [run / "lens", tmp_path / "copy", run / "lens"])
    assert list(lenses) == ["logit", f"tuned ({run / 'lens'})", f"tuned ({tmp_path / 'copy'})"]
    assert list(eval_dirs) == [f"tuned ({run / 'lens'})"]
    with pytest.raises(LensFileError):
        load_lenses(model, [tmp_path / "nothing"])


def test_a_request_shows_the_library_trajectory(url, model, tiny_tokenizer, tuned):
    event, (message, plot, *_) = call(url, "show", [TEXT, "tuned", "kl", 3])
    assert event == "complete"
    tokens = len(tiny_tokenizer(TEXT).input_ids)
    assert message.startswith(f"{tokens} tokens × 4 rows") and "top 3" in message
    assert heatmap_labels(plot) == [expected_labels(model, tiny_tokenizer, tuned, TEXT)]


def test_downloads_hold_the_figure_and_the_table(model, tiny_tokenizer, tuned, tmp_path):
    trajectories = Explorer(model, tiny_tokenizer, {"logit": LogitLens(model), "tuned": tuned}).trajectories(TEXT, "logit vs tuned")
    paths = write_downloads(trajectories, "rank", tmp_path)
    assert {suffix: path.name for suffix, path in paths.items()} == {
        suffix: f"depthlens-logit-tuned-rank.{suffix}" for suffix in ("png", "html", "csv")
    }
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert b"logit \xe2\x88\x92 tuned" in paths["html"].read_bytes() and b"Plotly.newPlot" in paths["html"].read_bytes()
    expected = pd.concat([t.to_dataframe() for t in trajectories], ignore_index=True).to_csv(index=False)
    assert paths["csv"].read_text() == expected


def test_side_by_side_shows_both_lenses(url, model, tiny_tokenizer, tuned):
    event, (_, plot, *_) = call(url, "show", [TEXT, "logit vs tuned", "rank", 5])
    assert event == "complete"
    assert heatmap_labels(plot) == [expected_labels(model, tiny_tokenizer, lens, TEXT) for lens in (LogitLens(model), tuned)]
    assert "logit − tuned" in plot["plot"]


def test_an_over_long_text_gets_a_message_naming_the_limit(url, model, tiny_tokenizer):
    text = " ".join([TEXT] * 3)
    event, (message, plot, *_) = call(url, "show", [text, "logit", "entropy", 5])
    tokens = len(tiny_tokenizer(text).input_ids)
    assert event == "complete" and plot is None
    assert f"{tokens} tokens" in message and f"at most {MAX_TOKENS} tokens" in message
    explorer = Explorer(model, tiny_tokenizer, {"logit": LogitLens(model)}, max_tokens=MAX_TOKENS)
    with pytest.raises(AppError, match=f"characters, and this app reads at most {MAX_TOKENS} tokens"):
        explorer.trajectories("x" * 10_000, "logit")
    with pytest.raises(AppError, match="empty"):
        explorer.trajectories("  ", "logit")
    assert Explorer(model, tiny_tokenizer, {"logit": LogitLens(model)}, max_tokens=10_000).max_tokens == 128


def test_only_configured_lenses_can_be_chosen(url, model, tiny_tokenizer, run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a request made the app open a lens directory")

    monkeypatch.setattr(TunedLens, "from_pretrained", refuse)
    for view in (str(run / "lens"), "../run/lens", "tuned (other)"):
        event, data = call(url, "show", [TEXT, view, "entropy", 5])
        assert event == "error" and "not in the list of choices" in data["error"]
    event, data = call(url, "evaluation", [str(run / "eval")])
    assert event == "error"
    explorer = Explorer(model, tiny_tokenizer, {"logit": LogitLens(model)})
    assert list(explorer.views) == ["logit"]
    with pytest.raises(AppError, match="unknown lens"):
        explorer.trajectories(TEXT, str(run / "lens"))
    with pytest.raises(AppError, match="top-k"):
        explorer.trajectories(TEXT, "logit", 0)


def test_the_evaluation_tab_shows_the_lens_evaluation(url):
    event, (note, image, table, files) = call(url, "evaluation", ["tuned"])
    assert event == "complete" and "held-out tokens" in note
    assert image["orig_name"] == "curves.png"
    assert table["headers"] == ["layer", "kl · logit", "kl · tuned", "ce · logit", "ce · tuned", "top1 · logit", "top1 · tuned"]
    assert [row[0] for row in table["data"]] == [0, 1, 2, 3]
    assert sorted(f["orig_name"] for f in files) == ["curves.html", "eval.csv", "eval.json"]


def test_without_an_evaluation_the_tab_says_so(model, tiny_tokenizer):
    demo = build_app(model, tiny_tokenizer, {"logit": LogitLens(model)})
    notes = [block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "evaluation-note"]
    assert len(notes) == 1 and "No evaluation was found" in notes[0]


def test_the_report_reads_back_as_written(run, tmp_path):
    from depthlens.errors import ReportError
    from depthlens.viz.report import REPORT_FILES, read_report, report_files, wide_table

    report = read_report(run / "eval")
    written = json.loads((run / "eval" / "eval.json").read_text())
    assert (report.table, report.tokens, report.bytes, report.meta) == (
        written["table"], written["tokens"], written["bytes"], written["meta"])
    assert report_files(run / "eval") == {kind: run / "eval" / name for kind, name in REPORT_FILES.items()}
    assert list(wide_table(report).columns)[:3] == ["layer", "kl · logit", "kl · tuned"]
    with pytest.raises(ReportError, match="run depthlens eval to make one"):
        read_report(tmp_path)
    (tmp_path / "eval.json").write_text("{not json")
    with pytest.raises(ReportError, match="cannot be read"):
        read_report(tmp_path)
    (tmp_path / "eval.json").write_text('{"tokens": 3, "table": [{"lens": "logit"}]}')
    with pytest.raises(ReportError, match="not an evaluation report"):
        read_report(tmp_path)


def test_a_damaged_evaluation_is_a_note_not_a_crash(model, tiny_tokenizer, run, tmp_path):
    shutil.copytree(run / "eval", tmp_path / "eval")
    (tmp_path / "eval" / "eval.json").write_text("[]")
    demo = build_app(model, tiny_tokenizer, {"logit": LogitLens(model)}, {"logit": tmp_path / "eval"})
    notes = [block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "evaluation-note"]
    assert len(notes) == 1 and "is not an evaluation report" in notes[0] and "the curves are shown as written" in notes[0]


def test_50_concurrent_requests_are_all_answered_correctly(url, model, tiny_tokenizer, tuned):
    words = TEXT.split()
    texts = [" ".join(words[i % 5 : i % 5 + 2] + [str(i)]) for i in range(50)]
    views = ["logit", "tuned", "logit vs tuned"]
    lenses = {"logit": [LogitLens(model)], "tuned": [tuned], "logit vs tuned": [LogitLens(model), tuned]}
    requests = [(text, views[i % 3]) for i, text in enumerate(texts)]
    expected = [[expected_labels(model, tiny_tokenizer, lens, text) for lens in lenses[view]] for text, view in requests]
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        futures = [pool.submit(call, url, "show", [text, view, "entropy", 5], 60.0) for text, view in requests]
        answers = [future.result(timeout=90) for future in futures]
    elapsed = time.monotonic() - began
    assert [event for event, _ in answers] == ["complete"] * 50
    assert [heatmap_labels(data[1]) for _, data in answers] == expected
    assert elapsed < 60, f"50 requests took {elapsed:.0f} s"


def test_the_command_serves_the_app(tmp_path, run, model, tiny_tokenizer):
    port = free_port()
    command = [sys.executable, "-m", "depthlens.apps.cli", "app", "--model", str(run.parent / "model"),
               "--lens", str(run / "lens"), "--port", str(port), "--max-tokens", str(MAX_TOKENS)]
    log = tmp_path / "app.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while process.poll() is None and time.monotonic() < deadline and f"open {url}" not in log.read_text():
            time.sleep(0.5)
        assert process.poll() is None and f"open {url}" in log.read_text(), log.read_text()
        assert httpx.get(url, timeout=10, trust_env=False).status_code == 200
        event, (message, plot, *_) = call(url, "show", [TEXT, "logit vs tuned", "entropy", 5])
        assert event == "complete" and message.startswith(f"{len(tiny_tokenizer(TEXT).input_ids)} tokens")
        tuned = TunedLens.from_pretrained(run / "lens", model)
        assert heatmap_labels(plot) == [expected_labels(model, tiny_tokenizer, lens, TEXT) for lens in (LogitLens(model), tuned)]
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0, log.read_text()


def test_a_taken_port_is_a_one_line_error(model, tiny_tokenizer):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        demo = build_app(model, tiny_tokenizer, {"logit": LogitLens(model)})
        with pytest.raises(AppError, match="pass another --port"):
            start(demo, "127.0.0.1", sock.getsockname()[1], quiet=True)


@pytest.mark.slow
def test_the_app_works_on_the_embedded_model(tmp_path):
    from depthlens.model.load import load_model

    model, tokenizer = load_model("smollm2-135m")
    text = "To be, or not to be, that is"
    with running_app(model, tokenizer, [], tmp_path) as address:
        event, (message, plot, *_) = call(address, "show", [text, "logit", "entropy", 5], 120)
    assert event == "complete" and "× 31 rows" in message
    (labels,) = heatmap_labels(plot)
    final = model(tokenizer(text, return_tensors="pt").input_ids).logits[0].argmax(-1).tolist()
    assert len(labels) == 31
    assert labels[-1] == [html.escape(shorten(token_label(tokenizer, t, LABEL_CHARS), 8)) for t in final]
