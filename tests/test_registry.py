"""The readout registry: how a lens spec finds its kind, and the kinds depthlens writes."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model

from depthlens import TunedLens, capture
from depthlens.apps.cli import main
from depthlens.errors import LensFileError
from depthlens.lenses import registry
from depthlens.lenses.attribute import AttributeLens
from depthlens.lenses.logit import LogitLens
from depthlens.lenses.registry import check_spec, kind_of, load_readout, register_readout
from depthlens.text.relations import Relation
from depthlens.text.tokens import token_label


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as if no kind had been registered or imported yet; restored afterwards."""
    monkeypatch.setattr(registry, "_REGISTERED", {})


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _attribute_lens(model, seed: int) -> AttributeLens:
    generator = torch.Generator().manual_seed(seed)
    shape = (model.config.num_hidden_layers + 1, model.config.hidden_size)
    return AttributeLens(model, torch.randn(*shape, shape[1], generator=generator) / 4,
                         torch.randn(shape, generator=generator), relation="fox")


def test_lens_folders_record_their_kind(model, tmp_path):
    TunedLens(model).save_pretrained(tmp_path / "tuned")
    _attribute_lens(model, 0).save_pretrained(tmp_path / "attribute")
    for kind in ("tuned", "attribute"):
        assert json.loads((tmp_path / kind / "config.json").read_text())["kind"] == kind
        assert kind_of(tmp_path / kind) == kind


def test_folders_written_before_kinds_load_by_their_lens_type(model, tmp_path):
    lens = _attribute_lens(model, 0)
    lens.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["kind"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = load_readout(tmp_path / "old", model)
    assert isinstance(loaded, AttributeLens) and torch.equal(loaded.weight, lens.weight)


def test_a_detector_recognises_a_foreign_folder_and_a_kind_key_wins(fresh_registry, model, tmp_path):
    register_readout("foreign", lambda path, parts: LogitLens(parts),
                     detect=lambda path: (path / "params.bin").is_file())
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "params.bin").write_bytes(b"")
    assert check_spec(tmp_path / "foreign") == "foreign"
    TunedLens(model).save_pretrained(tmp_path / "tuned")
    (tmp_path / "tuned" / "params.bin").write_bytes(b"")
    assert check_spec(tmp_path / "tuned") == "tuned"


def test_built_in_kinds_are_imported_on_first_use_and_cannot_be_replaced(fresh_registry, model, tmp_path):
    assert registry.registered_kinds()[:3] == ["logit", "tuned", "attribute"]
    assert registry._REGISTERED == {}
    TunedLens(model).save_pretrained(tmp_path / "tuned")
    assert isinstance(load_readout(tmp_path / "tuned", model), TunedLens)
    assert list(registry._REGISTERED) == ["tuned"]
    for name in ("logit", "tuned", "attribute", ""):
        with pytest.raises(ValueError, match="built in"):
            register_readout(name, lambda path, parts: LogitLens(parts))


def test_unknown_kinds_and_unrecognised_files_are_refused_with_the_fix(tmp_path):
    (tmp_path / "mystery").mkdir()
    (tmp_path / "mystery" / "config.json").write_text(json.dumps({"kind": "mystery"}))
    with pytest.raises(LensFileError, match="kind 'mystery', which nothing has registered .*import the module"):
        check_spec(tmp_path / "mystery")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(LensFileError, match="cannot be read as JSON"):
        check_spec(tmp_path / "broken")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LensFileError, match="is a folder that no registered readout kind recognises"):
        check_spec(tmp_path / "empty")


def test_a_bad_lens_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "mystery").mkdir()
    (tmp_path / "mystery" / "config.json").write_text(json.dumps({"kind": "mystery"}))
    for command in (["table", "hi"], ["show", "hi"], ["generate", "hi"], ["eval"], ["patchscope", "hi"]):
        assert main([*command, "--model", "/not/loaded.gguf", "--lens", str(tmp_path / "mystery")]) == 2
        err = capsys.readouterr().err.strip()
        assert "nothing has registered" in err and "\n" not in err, command


def test_an_attribute_lens_saved_by_the_command_reads_through_lens(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    relation = Relation("fox", ("The fox of {} is",),
                        (("quick", "brown"), ("lazy", "dog"), ("fair", "foul"), ("thunder", "rain")))
    (tmp_path / "fox.json").write_text(json.dumps(relation.to_json()))
    assert main(["attribute", "--model", str(tiny_model_dir), "--relation", str(tmp_path / "fox.json"),
                 "--train", "2", "--context", "1", "--save-lens", "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    text = "The fox of lazy is"
    assert main(["table", text, "--model", str(tiny_model_dir), "--lens", str(tmp_path / "out" / "lens-fox")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    model = tiny_model("llama")
    lens = AttributeLens.from_pretrained(tmp_path / "out" / "lens-fox", model)
    _, top1 = lens.top_k(capture(model, tiny_tokenizer(text, return_tensors="pt").input_ids), k=1)
    assert len(lines) == top1.shape[0]
    for line, row in zip(lines, top1[:, 0, :, 0].tolist()):
        assert [cell.strip() for cell in line.split("│")[2:-1]] == [token_label(tiny_tokenizer, t, 8) for t in row]


def test_an_installed_package_registers_its_kind_through_an_entry_point(fresh_registry, model, tmp_path,
                                                                        monkeypatch):
    """The ``depthlens`` command cannot import a user's module; a package that names it in the
    ``depthlens.readouts`` entry points is imported when a spec names an unknown kind."""
    (tmp_path / "site" / "plugged-0.1.dist-info").mkdir(parents=True)
    (tmp_path / "site" / "plugged-0.1.dist-info" / "METADATA").write_text("Name: plugged\nVersion: 0.1\n")
    (tmp_path / "site" / "plugged-0.1.dist-info" / "entry_points.txt").write_text(
        "[depthlens.readouts]\nplugged = plugged_readout\n")
    (tmp_path / "site" / "plugged_readout.py").write_text(
        "from depthlens.lenses.logit import LogitLens\n"
        "from depthlens.lenses.registry import register_readout\n"
        "register_readout('plugged', lambda path, parts: LogitLens(parts))\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(registry, "_PLUGINS_IMPORTED", [])
    (tmp_path / "lens").mkdir()
    (tmp_path / "lens" / "config.json").write_text(json.dumps({"kind": "plugged"}))
    assert "plugged" not in registry.registered_kinds()
    assert isinstance(load_readout(tmp_path / "lens", model), LogitLens)
    assert registry.registered_kinds()[-1] == "plugged" and registry._PLUGINS_IMPORTED == ["plugged_readout"]
