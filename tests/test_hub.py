"""Lenses from and to the Hugging Face Hub: the ``hf:`` spec, its download (monkeypatched: no network
here), the offline error, the model card and what ``depthlens push`` would upload."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from tiny_models import random_tuned_lens, tiny_model

from depthlens import TunedLens
from depthlens.analysis.evaluate import EvalReport
from depthlens.apps.cli import main
from depthlens.apps.hub_push import model_card, prepare_card
from depthlens.errors import LensFileError
from depthlens.lenses import hub
from depthlens.lenses.hub import HubSpec, parse_hub_spec
from depthlens.lenses.registry import kind_of, load_readout, locate
from depthlens.lenses.spec import load_lenses
from depthlens.lenses.tuned_lens_format import export_tuned_lens


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """No test reaches the hub: downloads fail unless a test replaces them, the hub cache is an
    empty folder, and nothing fetched by one test is remembered in the next."""
    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked although the spec is local")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hub, "_FETCHED", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("depthlens: error: "), err
    return err


@pytest.mark.parametrize(("spec", "expected"), [
    ("hf:me/lenses", HubSpec("me/lenses")),
    ("hf://me/lenses", HubSpec("me/lenses")),
    ("hf:spaces/AlignmentResearch/tuned-lens/lens/gpt2",
     HubSpec("AlignmentResearch/tuned-lens", "space", "lens/gpt2")),
    ("hf:datasets/me/d/a/b@v1.0", HubSpec("me/d", "dataset", "a/b", "v1.0")),
    ("hf:me/lenses/smollm2-135m@refs/pr/3", HubSpec("me/lenses", "model", "smollm2-135m", "refs/pr/3")),
    ("hf:me/lenses@feature%2Fx", HubSpec("me/lenses", "model", "", "feature/x")),
])
def test_hub_specs_parse_into_repository_type_subfolder_and_revision(spec, expected):
    assert parse_hub_spec(spec) == expected
    assert parse_hub_spec(str(expected)) == expected


@pytest.mark.parametrize("spec", ["hf:me", "hf:me/", "hf:me//x", "hf:me/x/../y", "hf:me/x@", "hf:me/-x",
                                  "hf:me/a--b", "hf:spaces/x", "me/lenses"])
def test_malformed_hub_specs_name_the_grammar(spec):
    with pytest.raises(LensFileError, match=r"hf:\[spaces/\|datasets/\]OWNER/NAME"):
        parse_hub_spec(spec)


def test_a_local_folder_wins_and_a_relative_path_is_never_a_hub_name(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    TunedLens(model).save_pretrained(Path("hf:me") / "lens")
    TunedLens(model).save_pretrained(Path("runs") / "x")
    assert locate("hf:me/lens") == Path("hf:me/lens")
    assert locate("runs/x") == Path("runs/x")
    with pytest.raises(LensFileError, match=r"neither 'logit' nor an existing lens folder.*hf:\[spaces/"):
        locate("runs/y")  # an owner/name-shaped relative path that does not exist: an error, not a download


def _fake_snapshot(root: Path, calls: list[dict]):
    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return str(root)
    return snapshot_download


def test_a_downloaded_depthlens_folder_loads_into_a_working_readout(model, tmp_path, monkeypatch):
    lens = random_tuned_lens(model, seed=1, std=0.1)
    lens.save_pretrained(tmp_path / "snapshot" / "lens" / "tiny")
    calls: list[dict] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(tmp_path / "snapshot", calls))
    spec = "hf:spaces/owner/lenses/lens/tiny@v2"
    loaded = load_readout(spec, model)
    assert isinstance(loaded, TunedLens)
    assert calls == [{"repo_id": "owner/lenses", "repo_type": "space", "revision": "v2",
                      "allow_patterns": ["lens/tiny", "lens/tiny/*"], "local_files_only": False,
                      "library_name": "depthlens"}]
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(1, 3, model.config.hidden_size, generator=generator)
              for _ in range(model.config.num_hidden_layers + 1)]
    for (layer, got), (_, want) in zip(loaded.iter_logits(states), lens.iter_logits(states), strict=True):
        assert torch.equal(got, want), layer
    assert load_readout(spec, model) is not loaded and len(calls) == 1  # fetched once per process


def test_commands_name_a_hub_readout_by_its_spec_not_its_cache_path(model, tmp_path, monkeypatch):
    random_tuned_lens(model, seed=1, std=0.1).save_pretrained(tmp_path / "snapshot")
    TunedLens(model).save_pretrained(tmp_path / "local")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(tmp_path / "snapshot", []))
    lenses, _sources = load_lenses(model, ["hf://me/lenses", tmp_path / "local"])
    assert list(lenses) == ["logit", "tuned (hf:/me/lenses)", f"tuned ({tmp_path / 'local'})"]
    assert isinstance(lenses["tuned (hf:/me/lenses)"], TunedLens)


def test_a_downloaded_tuned_lens_space_folder_goes_through_kind_detection(model, tmp_path, monkeypatch):
    export_tuned_lens(random_tuned_lens(model, seed=2, std=0.1), tmp_path / "snapshot" / "lens" / "tiny")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(tmp_path / "snapshot", []))
    assert kind_of(locate("hf:spaces/AlignmentResearch/tuned-lens/lens/tiny")) == "tuned-lens"


def test_a_subfolder_missing_from_the_repository_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "snapshot").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(tmp_path / "snapshot", []))
    with pytest.raises(LensFileError, match="owner/lenses has no 'lens/gpt9' at revision main.*lens/<model id>"):
        locate("hf:spaces/owner/lenses/lens/gpt9")


def test_offline_without_a_cached_copy_is_one_line_naming_offline_mode_and_the_fix(monkeypatch, capsys, tmp_path):
    monkeypatch.undo()  # the real snapshot_download, in offline mode, on an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub, "_FETCHED", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(["show", "some text", "--lens", "hf:spaces/AlignmentResearch/tuned-lens/lens/gpt2"]) == 2
    message = _one_line_error(capsys)
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert ("hf download AlignmentResearch/tuned-lens --repo-type space --include 'lens/gpt2/*' --local-dir DIR "
            "and pass --lens DIR/lens/gpt2") in message


def test_offline_a_cached_copy_is_used_without_asking_the_hub(model, tmp_path, monkeypatch):
    TunedLens(model).save_pretrained(tmp_path / "cached")

    def cached_only(repo_id, **kwargs):
        assert kwargs["local_files_only"], "offline mode must not look the repository up on the hub"
        return str(tmp_path / "cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(load_readout("hf:me/lenses", model), TunedLens)


def test_a_connection_error_is_the_same_one_line(monkeypatch):
    def unreachable(*args, **kwargs):
        raise httpx.ConnectError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(LensFileError, match=r"cannot be reached \(no connection\).*hf download me/lenses --local-dir"):
        locate("hf:me/lenses")


def _trained_lens_with_eval(model, root: Path) -> tuple[TunedLens, EvalReport]:
    """A lens folder in ``root/lens`` with training info, and its evaluation in ``root/eval``."""
    lens = random_tuned_lens(model, seed=3, std=0.1)
    lens.training_info = {"config": {"model": "tiny", "data": "mixed", "objective": "kl", "lr": 0.005, "chunk_len": 64},
                          "steps": 12, "tokens": 3072, "seconds": 4.5, "sources": {"plays": 0.75, "code": 0.25}}
    lens.save_pretrained(root / "lens")
    table = [{"lens": name, "layer": layer, "metric": metric, "unit": unit,
              "value": 1 + layer + 0.1 * (metric == "ce") + 0.01 * (name == "tuned") + 0.5 * (metric == "top1"),
              "ci_low": None, "ci_high": None}
             for name in ("logit", "tuned") for metric, unit in (("kl", "nats"), ("ce", "nats"), ("top1", "fraction"))
             for layer in range(model.config.num_hidden_layers + 1)]
    report = EvalReport(table=table, tokens=2048, bytes=9000, meta={"interval_note": "too little data"})
    (root / "eval").mkdir()
    (root / "eval" / "eval.json").write_text(json.dumps(report.to_json()))
    return lens, report


def _card_table(card: str) -> dict[str, dict[int, str]]:
    """The card's evaluation table as column → layer → cell."""
    lines = [line for line in card.splitlines() if line.startswith("| layer |")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = card[card.index(lines[0]):].splitlines()[2:]
    columns: dict[str, dict[int, str]] = {name: {} for name in header[1:]}
    for row in rows:
        if not row.startswith("|"):
            break
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        for name, cell in zip(header[1:], cells[1:], strict=True):
            columns[name][int(cells[0])] = cell
    return columns


def test_the_card_holds_model_fingerprint_data_recipe_and_the_evaluation_table(model, tmp_path):
    lens, report = _trained_lens_with_eval(model, tmp_path)
    card = prepare_card(tmp_path / "lens", HubSpec("me/lenses", subfolder="tiny"))
    assert card.startswith("---\nlibrary_name: depthlens\n")
    assert f"| fingerprint | `{lens.model_info()['fingerprint']}` |" in card
    assert f"| layers | `{model.config.num_hidden_layers}` |" in card
    assert "| sources (share of tokens) | code: 0.25, plays: 0.75 |" in card
    assert "| tokens | 3072 |" in card and "| lr | 0.005 |" in card and "| objective | kl |" in card
    assert "--lens hf:me/lenses/tiny" in card and "on 2048 held-out tokens (no intervals: too little data)" in card
    columns = _card_table(card)
    assert list(columns) == [f"{metric} · {name}" for metric in ("kl", "ce", "top1") for name in ("logit", "tuned")]
    for row in report.table:
        assert columns[f"{row['metric']} · {row['lens']}"][row["layer"]] == f"{row['value']:.3f}"


def test_a_card_says_what_a_foreign_lens_does_not_record():
    card = model_card("jacobian", {}, None, "hf:me/j")
    assert "The lens does not record its model." in card and "Not recorded" in card
    assert "No evaluation was found beside the lens" in card


@pytest.fixture
def fake_api(monkeypatch):
    """``HfApi``'s writing calls replaced: each records its arguments, ``upload_folder`` also the
    files it would send."""
    calls: dict[str, dict] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        kwargs["files"] = {p.name: p.read_bytes() for p in folder.iterdir()}
        calls["upload_folder"] = kwargs
        return "https://huggingface.co/me/lenses/commit/abc"

    for name, function in (("create_repo", create_repo), ("create_branch", create_branch),
                           ("upload_folder", upload_folder)):
        monkeypatch.setattr(huggingface_hub.HfApi, name, function)
    return calls


def test_push_uploads_the_lens_files_and_its_card_in_one_call(model, tmp_path, fake_api, capsys):
    _trained_lens_with_eval(model, tmp_path)
    assert main(["push", str(tmp_path / "lens"), "hf:me/lenses/tiny", "--private", "--branch", "dev"]) == 0
    upload = fake_api["upload_folder"]
    assert fake_api["create_repo"] == {"repo_id": "me/lenses", "repo_type": "model", "private": True, "exist_ok": True}
    assert fake_api["create_branch"] == {"repo_id": "me/lenses", "repo_type": "model", "branch": "dev",
                                         "exist_ok": True}
    assert (upload["repo_id"], upload["path_in_repo"], upload["revision"]) == ("me/lenses", "tiny", "dev")
    lens_files = {p.name: p.read_bytes() for p in (tmp_path / "lens").iterdir()}
    assert upload["files"] == {**lens_files, "README.md": upload["files"]["README.md"]}
    card = upload["files"]["README.md"].decode()
    assert card == prepare_card(tmp_path / "lens", HubSpec("me/lenses", subfolder="tiny", revision="dev"))
    assert "--lens hf:me/lenses/tiny@dev" in capsys.readouterr().out


def _damaged_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize(("lens", "repo", "damage", "message"), [
    ("missing", "me/lenses", None, "LENS '{root}/missing' does not exist"),
    ("lens", "not a repo", None, "REPO 'not a repo' is not a Hugging Face Hub lens spec"),
    ("lens", "hf:me/lenses@x", "branch", "names branch 'x' but --branch says 'dev'"),
    ("lens", "me/lenses", "weights", "model.safetensors"),
    ("lens", "me/lenses", "config", "cannot be read as JSON"),
    ("lens", "me/lenses", "eval", "is not an evaluation report"),
    ("lens", "me/lenses", "offline", "offline mode is on (HF_HUB_OFFLINE=1)"),
])
def test_push_checks_everything_before_uploading(model, tmp_path, fake_api, capsys, monkeypatch,
                                                 lens, repo, damage, message):
    _trained_lens_with_eval(model, tmp_path)
    extra = ["--branch", "dev"] if damage == "branch" else []
    if damage == "weights":
        _damaged_weights(tmp_path / "lens")
    elif damage == "config":
        (tmp_path / "lens" / "config.json").write_text("{not json")
    elif damage == "eval":
        (tmp_path / "eval" / "eval.json").write_text("[]")
    elif damage == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(tmp_path / lens), repo, *extra]) == 2
    assert message.format(root=tmp_path) in _one_line_error(capsys)
    assert fake_api == {}
