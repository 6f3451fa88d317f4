"""Lens directories: safetensors + JSON, fingerprinted, atomic, and strict when loading."""

import hashlib
import json
import os
import stat
import struct

import pytest
import torch
from safetensors.torch import save
from tiny_models import VOCAB, tiny_model

from depthlens import LensFileError, TunedLens, capture, find_parts
from depthlens.atomic import write_file
from depthlens.lenses.lens_file import fingerprint


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


@pytest.fixture()
def trained(model):
    lens = TunedLens(model, training={"steps": 7, "objective": "kl"})
    torch.manual_seed(3)
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_(0, 0.05)
    return lens


@pytest.fixture()
def saved(trained, tmp_path):
    return trained.save_pretrained(tmp_path / "lens")


def test_round_trip_gives_the_same_lens(model, trained, saved):
    loaded = TunedLens.from_pretrained(saved, model)
    states = capture(model, torch.randint(0, VOCAB, (1, 5)))
    for layer in range(len(states)):
        assert torch.equal(loaded(states[layer], layer), trained(states[layer], layer))
    assert loaded.training_info == {"steps": 7, "objective": "kl"}


def test_directory_holds_safetensors_and_json_only(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    raw = (saved / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert "translators.0.weight" in header
    config = json.loads((saved / "config.json").read_text())
    assert config["model"] == {
        "name_or_path": model.config._name_or_path or type(model).__name__,
        "model_type": "llama",
        "num_layers": 3,
        "d_model": 32,
        "vocab_size": VOCAB,
        "fingerprint": fingerprint(find_parts(model)),
    }
    assert config["library_version"] and config["lens_type"] == "tuned"
    assert config["training"]["steps"] == 7


def test_fingerprint_ignores_precision_but_not_values(model):
    parts = find_parts(model)
    assert fingerprint(parts) == fingerprint(find_parts(tiny_model("llama", seed=0).to(torch.bfloat16)))
    changed = tiny_model("llama", seed=0)
    with torch.no_grad():
        changed.lm_head.weight[5, 7] += 0.5
    assert fingerprint(find_parts(changed)) != fingerprint(parts)


def test_loading_onto_another_model_names_both(saved):
    other = tiny_model("llama", seed=1)
    other.config._name_or_path = "other-model"
    with pytest.raises(LensFileError, match=r"trained for .* but the model given is 'other-model'"):
        TunedLens.from_pretrained(saved, other)


def test_truncated_weights_are_rejected(model, saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LensFileError, match="truncated or was modified"):
        TunedLens.from_pretrained(saved, model)


def test_tampered_weights_are_rejected(model, saved):
    path = saved / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(LensFileError, match="truncated or was modified"):
        TunedLens.from_pretrained(saved, model)


def _rewrite(saved, tensors):
    payload = save(tensors)
    (saved / "model.safetensors").write_bytes(payload)
    config = json.loads((saved / "config.json").read_text())
    config["weights_sha256"] = hashlib.sha256(payload).hexdigest()
    (saved / "config.json").write_text(json.dumps(config))


def test_wrong_shapes_and_non_finite_values_are_rejected(model, trained, saved):
    tensors = {k: v.clone() for k, v in trained.state_dict().items()}
    tensors["translators.1.bias"] = torch.zeros(31)
    _rewrite(saved, tensors)
    with pytest.raises(LensFileError, match=r"translators.1.bias has shape \(31,\)"):
        TunedLens.from_pretrained(saved, model)
    tensors["translators.1.bias"] = torch.full((32,), float("nan"))
    _rewrite(saved, tensors)
    with pytest.raises(LensFileError, match="NaN"):
        TunedLens.from_pretrained(saved, model)


def test_missing_or_foreign_files_are_rejected(model, saved, tmp_path):
    with pytest.raises(LensFileError, match="config.json is missing"):
        TunedLens.from_pretrained(tmp_path, model)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(LensFileError, match="not valid JSON"):
        TunedLens.from_pretrained(saved, model)
    (saved / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(LensFileError, match="not a depthlens lens config"):
        TunedLens.from_pretrained(saved, model)


def test_newer_format_asks_for_an_upgrade(model, saved):
    config = json.loads((saved / "config.json").read_text())
    config["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensFileError, match="upgrade depthlens"):
        TunedLens.from_pretrained(saved, model)


def test_failed_save_leaves_the_previous_lens_intact(model, trained, saved, monkeypatch):
    before = (saved / "model.safetensors").read_bytes()
    with torch.no_grad():
        trained.translators[0].bias.add_(1.0)

    def fail(_fd):
        raise OSError("disk full")

    monkeypatch.setattr("depthlens.atomic.os.fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        trained.save_pretrained(saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["lens"]
    TunedLens.from_pretrained(saved, model)


def test_saved_files_get_ordinary_permissions(trained, tmp_path):
    old = os.umask(0o022)
    try:
        path = trained.save_pretrained(tmp_path / "lens")
        write_file(tmp_path / "eval.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "eval.json").stat().st_mode) == 0o644
