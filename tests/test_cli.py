"""The command-line tool, on a tiny model saved to disk."""

import pytest
import torch
from tiny_models import tiny_model

from depthlens import LogitLens, TunedLens, capture
from depthlens.apps.cli import main
from depthlens.errors import UsageError
from depthlens.text.tokens import token_label


def _expected_rows(model, ids, lens, tokenizer):
    _, top1 = lens.top_k(capture(model, ids), k=1)
    return [[token_label(tokenizer, t, 8) for t in row] for row in top1[:, 0, :, 0].tolist()]


def test_table_prints_top1_per_layer_and_position(tiny_model_dir, tiny_tokenizer, capsys):
    assert main(["table", "Fair is foul", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    model = tiny_model("llama")
    ids = tiny_tokenizer("Fair is foul", return_tensors="pt").input_ids
    rows = _expected_rows(model, ids, LogitLens(model), tiny_tokenizer)
    lines = [line for line in out.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in lines] == ["0", "1", "2", "output"]
    for line, row in zip(lines, rows):
        assert [cell.strip() for cell in line.split("│")[2:-1]] == row


def test_table_reads_stdin_and_a_tuned_lens(tiny_model_dir, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    model = tiny_model("llama")
    model.config._name_or_path = str(tiny_model_dir)
    lens = TunedLens(model)
    with torch.no_grad():
        lens.translators[0].bias.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    lens.save_pretrained(tmp_path / "lens")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("To be or not"))
    assert main(["table", "-", "--model", str(tiny_model_dir), "--lens", str(tmp_path / "lens")]) == 0
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("│"))
    ids = tiny_tokenizer("To be or not", return_tensors="pt").input_ids
    assert [c.strip() for c in first.split("│")[2:-1]] == _expected_rows(model, ids, lens, tiny_tokenizer)[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["table", "hi", "--model", "/no/such.gguf"], "no such GGUF file"),
        (["table", "   "], "the text is empty"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("depthlens: error:") and message in err and "\n" not in err


def test_token_labels_show_whitespace_and_shorten(tiny_tokenizer):
    space = tiny_tokenizer(" ", add_special_tokens=False).input_ids[0]
    newline = tiny_tokenizer("\n", add_special_tokens=False).input_ids[0]
    assert token_label(tiny_tokenizer, space) == "·"
    assert token_label(tiny_tokenizer, newline) == "⏎"
    emoji_bytes = tiny_tokenizer("🎭", add_special_tokens=False).input_ids
    assert all("\ufffd" not in token_label(tiny_tokenizer, t) for t in emoji_bytes)
    long_id = max(range(len(tiny_tokenizer)), key=lambda t: len(tiny_tokenizer.decode([t])))
    label = token_label(tiny_tokenizer, long_id, max_chars=3)
    assert len(label) == 3 and label.endswith("…")


class _Pieces:
    """A stand-in tokenizer whose token ``i`` decodes to ``pieces[i]``."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return self.pieces[ids[0]]

    def convert_ids_to_tokens(self, token_id):
        return f"<{token_id}>"


def test_token_labels_make_invisible_characters_visible():
    tokenizer = _Pieces(["\u00a0a", "\x00", "\x1b[", "a\u200bb", "\u2028", "\x7f", "plain"])
    labels = [token_label(tokenizer, i) for i in range(7)]
    assert labels == ["⍽a", "␀", "␛[", "a\\u200bb", "\\u2028", "␡", "plain"]


def test_lens_specs_name_the_logit_lens_or_a_lens_folder_of_any_kind(tmp_path):
    import json

    from depthlens.errors import LensFileError
    from depthlens.lenses.attribute import AttributeLens
    from depthlens.lenses.registry import load_readout
    from depthlens.lenses.spec import load_lenses

    model = tiny_model("llama")
    assert isinstance(load_readout("logit", model), LogitLens)
    TunedLens(model).save_pretrained(tmp_path / "run" / "lens")
    assert isinstance(load_readout(tmp_path / "run" / "lens", model), TunedLens)
    shape = (model.config.num_hidden_layers + 1, model.config.hidden_size)
    AttributeLens(model, torch.zeros(*shape, shape[1]), torch.zeros(shape)).save_pretrained(tmp_path / "attr")
    assert isinstance(load_readout(tmp_path / "attr", model), AttributeLens)
    (tmp_path / "file").write_text("x")
    for bad, problem in (("tuned", "neither 'logit' nor an existing lens folder or file"),
                         (tmp_path / "file", "is a file that no registered readout kind recognises")):
        with pytest.raises(LensFileError, match=problem):
            load_readout(bad, model)
    lenses, sources = load_lenses(model, ["logit", tmp_path / "run" / "lens", tmp_path / "attr"])
    assert list(lenses) == ["logit", "tuned", "attribute"]
    assert sources == {"tuned": tmp_path / "run" / "lens", "attribute": tmp_path / "attr"}

    TunedLens(model).save_pretrained(tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    del config["kind"], config["lens_type"]  # a tuned lens saved before kinds were recorded
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    lenses, sources = load_lenses(model, [tmp_path / "run" / "lens", tmp_path / "other", tmp_path / "run" / "lens"])
    names = [f"tuned ({tmp_path / 'run' / 'lens'})", f"tuned ({tmp_path / 'other'})"]
    assert list(lenses) == ["logit", *names] and list(sources) == names
    assert all(isinstance(lenses[name], TunedLens) for name in names)


def test_the_command_line_imports_no_heavy_library_to_build_its_parser():
    """``depthlens --help`` must answer at once: importing the CLI and building its parser
    imports none of torch, transformers, gradio, plotly or scikit-learn (a fresh interpreter)."""
    import json
    import subprocess
    import sys

    heavy = ["torch", "transformers", "gradio", "plotly", "sklearn"]
    probe = ("import json, sys; import depthlens.apps.cli as cli; cli.build_parser(); "
             f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


def test_run_folders_are_laid_out_in_one_place(tmp_path, monkeypatch):
    from depthlens.training import runs

    assert runs.run_dir("models/tiny.gguf") == runs.RUNS / "tiny"
    assert runs.run_dir("HuggingFaceTB/SmolLM2-135M/") == runs.RUNS / "SmolLM2-135M"
    assert runs.run_dir("tiny", out=tmp_path / "mine") == tmp_path / "mine"
    run = tmp_path / "run"
    assert runs.run_of_lens(runs.lens_dir(run)) == run
    assert runs.eval_dir_of_lens(runs.lens_dir(run)) == runs.eval_dir(run) == run / "eval"
    assert runs.checkpoint_dir(run) == run / "checkpoint"
    monkeypatch.chdir(tmp_path)
    assert runs.trained_lens("tiny") is None
    (tmp_path / "runs" / "tiny" / "lens").mkdir(parents=True)
    assert runs.trained_lens("tiny") == runs.RUNS / "tiny" / "lens"
    (tmp_path / "runs" / "tiny" / "eval").mkdir()
    assert runs.find_evaluations({"a": runs.RUNS / "tiny" / "lens", "b": run / "lens"}) == {"a": runs.RUNS / "tiny" / "eval"}


def test_eval_refuses_an_unwritable_output_before_loading(tiny_model_dir, tmp_path, capsys):
    model = tiny_model("llama")
    TunedLens(model).save_pretrained(tmp_path / "lens")
    (tmp_path / "somefile.txt").write_text("x")
    out = tmp_path / "somefile.txt" / "eval"
    assert main(["eval", "--model", "/not/loaded", "--lens", str(tmp_path / "lens"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"depthlens: error: cannot write the folder {out}: {tmp_path / 'somefile.txt'} is a file, not a folder; choose another output path"


def test_one_layers_grammar_numbers_and_inclusive_ranges():
    from depthlens.apps.options import parse_layers

    assert parse_layers(None) is None
    cases = {"0,5,10": [0, 5, 10], "0:30:3": list(range(0, 31, 3)), "2,28:": [2, 28, 29, 30], ":2": [0, 1, 2],
             "4, 1:2, 4": [4, 1, 2], "::15": [0, 15, 30]}
    for text, layers in cases.items():
        assert parse_layers(text).resolve(30) == layers, text
    for text, problem in (("5:2", "'5:2' selects no layer .*write 2:5"), ("0:9:0", "step of '0:9:0' must be at least 1"),
                          ("-1", "'-1' is not a layer number"), ("1,,2", "'' is not a layer number"),
                          ("a:3", "'a:3' is not")):
        with pytest.raises(UsageError, match=problem):
            parse_layers(text)
    for text in ("0:31", "31", "31:"):
        with pytest.raises(UsageError, match="names layer 31, but this model has layers 0 … 30"):
            parse_layers(text).resolve(30)


@pytest.mark.parametrize("command", [["generate", "Fair"], ["causal"], ["drift"], ["patchscope", "Fair", "--identity-curve"]])
def test_every_command_refuses_an_empty_layer_range_before_loading(command, tmp_path, capsys):
    out = [] if command[0] in ("generate", "patchscope") else ["--out", str(tmp_path / "out")]
    assert main([*command, "--model", "/not/loaded.gguf", "--layers", "5:2", *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "depthlens: error: --layers '5:2': '5:2' selects no layer (ranges include both ends and go up: write 2:5)"
