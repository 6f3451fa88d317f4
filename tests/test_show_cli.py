"""``depthlens show``: pictures, tables and summaries from the command line, on a tiny model."""

import io

import pandas as pd
import pytest
import torch
from tiny_models import tiny_model

from depthlens import LogitLens, TunedLens
from depthlens.analysis.trajectory import Trajectory
from depthlens.apps.cli import main

TEXT = "Fair is foul, and foul is fair"






@pytest.fixture(scope="module")
def lens_dir(tiny_model_dir, tmp_path_factory):
    model = tiny_model("llama")
    model.config._name_or_path = str(tiny_model_dir)
    lens = TunedLens(model)
    with torch.no_grad():
        for translator in lens.translators:
            translator.bias.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    return lens.save_pretrained(tmp_path_factory.mktemp("lens") / "lens")


def _expected(tiny_model_dir, tiny_tokenizer, lens_dir=None):
    model = tiny_model("llama")
    lens = LogitLens(model) if lens_dir is None else TunedLens.from_pretrained(lens_dir, model)
    return Trajectory.from_text(model, tiny_tokenizer, lens, TEXT)


def test_summary_without_out(tiny_model_dir, capsys):
    assert main(["show", TEXT, "--model", str(tiny_model_dir), "--layer-stride", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("logit lens on ")
    assert [line.split()[0] for line in lines[2:]] == ["0", "2", "output"]


def test_csv_holds_the_lens_predictions(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "table.csv"
    assert main(["show", TEXT, "--model", str(tiny_model_dir), "--lens", "logit", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    table = pd.read_csv(out, keep_default_na=False, na_values=[""])
    expected = _expected(tiny_model_dir, tiny_tokenizer).to_dataframe()
    assert table.prediction.tolist() == expected.prediction.tolist()
    assert table.value.to_numpy() == pytest.approx(expected.value.to_numpy(), nan_ok=True, abs=1e-6)


def test_compare_draws_logit_and_tuned(tiny_model_dir, lens_dir, tiny_tokenizer, tmp_path):
    png, csv = tmp_path / "pair.png", tmp_path / "pair.csv"
    for out in (png, csv):
        assert main(["show", TEXT, "--model", str(tiny_model_dir), "--lens", str(lens_dir), "--compare",
                     "--stat", "rank", "--out", str(out)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    tuned = table[table.lens == "tuned lens"]
    assert tuned.prediction.tolist() == _expected(tiny_model_dir, tiny_tokenizer, lens_dir).to_dataframe().prediction.tolist()
    assert set(table.lens) == {"logit lens", "tuned lens"}


def test_text_from_stdin_and_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "text.txt").write_text(TEXT + "\n", encoding="utf-8")
    assert main(["show", "--file", str(tmp_path / "text.txt"), "--model", str(tiny_model_dir)]) == 0
    from_file = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXT + "\n"))
    assert main(["show", "-", "--model", str(tiny_model_dir)]) == 0
    assert capsys.readouterr().out == from_file


def test_long_text_is_cut_with_a_note(tiny_model_dir, capsys):
    assert main(["show", TEXT, "--model", str(tiny_model_dir), "--max-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "showing the first 3 of" in captured.err
    assert ", 3 tokens:" in captured.out


def test_the_trained_lens_is_the_default(tiny_model_dir, lens_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["show", TEXT, "--model", str(tiny_model_dir), "--out", "table.csv"]
    assert main(argv) == 0
    assert set(pd.read_csv("table.csv").lens) == {"logit lens"}
    TunedLens.from_pretrained(lens_dir, tiny_model("llama")).save_pretrained(tmp_path / "runs" / "tiny-llama" / "lens")
    assert main(argv) == 0
    assert set(pd.read_csv("table.csv").lens) == {"tuned lens"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", TEXT, "--stat", "bogus"], "unknown statistic 'bogus': choose one of entropy, kl, ce, rank, prob"),
        (["show", TEXT, "--out", "fig.jpg"], "the file name must end in one of .html, .png, .pdf, .svg, .csv"),
        (["show", "  \n"], "the text is empty"),
        (["show", "--file", "/no/such/file.txt"], "cannot read /no/such/file.txt: No such file or directory"),
        (["show", TEXT, "--file", "x.txt"], "give the text or --file, not both"),
        (["show", TEXT, "--compare", "--lens", "logit"], "--compare needs a lens other than logit"),
        (["show", TEXT, "--max-tokens", "0"], "--max-tokens must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("depthlens: error: ") and message in err and "\n" not in err


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("depthlens: error: ") and "\n" not in err and "Traceback" not in captured.err
    return err


def test_an_empty_text_is_refused_wherever_it_comes_from(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    for argv in (["show", ""], ["show", "-"], ["show", "--file", str(tmp_path / "empty.txt")], ["table", ""]):
        assert main([*argv, "--model", str(tiny_model_dir)]) == 2
        assert "the text is empty" in _one_line_error(capsys)


def test_an_unwritable_output_path_is_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "somefile.txt").write_text("x")
    (tmp_path / "folder.csv").mkdir()
    for out, reason in ((tmp_path / "somefile.txt" / "out.png", "somefile.txt is a file, not a folder"),
                        (tmp_path / "somefile.txt" / "deeper" / "t.csv", "somefile.txt is a file, not a folder"),
                        (tmp_path / "folder.csv", "a folder of that name exists")):
        assert main(["show", TEXT, "--model", str(tiny_model_dir), "--out", str(out)]) == 2
        err = _one_line_error(capsys)
        assert f"cannot write the file {out}" in err and reason in err
    assert main(["show", TEXT, "--model", str(tiny_model_dir), "--out", str(tmp_path / "new" / "t.csv")]) == 0
    assert (tmp_path / "new" / "t.csv").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", TEXT, "--lens", "no-such-lens"], "lens 'no-such-lens' is neither 'logit' nor an existing lens folder or file"),
        (["show", TEXT, "--k", "0"], "--k must be at least 1"),
        (["show", TEXT, "--layer-stride", "0"], "--layer-stride must be at least 1"),
        (["table", TEXT, "--every", "0"], "--every must be at least 1"),
        (["table", TEXT, "--lens", "no-such-lens"], "pass --lens logit, or a lens folder of a registered kind"),
        (["eval", "--lens", "logit"], "pass --lens with a lens folder, not logit"),
        (["eval", "--model", "nothing-trained"], "there is no trained lens in runs/nothing-trained/lens"),
        (["app", "--lens", "no-such-lens"], "is neither 'logit' nor an existing lens folder or file"),
    ],
)
def test_more_bad_input_is_one_line_and_status_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


def test_layers_pick_the_rows_of_show_and_table(tiny_model_dir, capsys):
    """``--layers`` (the grammar every command shares) picks rows; with a stride it is refused."""
    assert main(["show", TEXT, "--model", str(tiny_model_dir), "--layers", "0,2:3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["0", "2", "output"]
    assert main(["table", TEXT, "--model", str(tiny_model_dir), "--layers", "1:2"]) == 0
    rows = [line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines() if line.count("│") > 2]
    assert [row for row in rows if row and row != "layer"] == ["1", "2"]
    assert main(["show", TEXT, "--model", str(tiny_model_dir), "--layers", "1", "--layer-stride", "2"]) == 2
    assert "--layers and --layer-stride both pick layers" in capsys.readouterr().err
