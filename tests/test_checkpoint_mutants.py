"""Checkpoints restore optimizer state exactly (tensor and non-tensor entries, any key) and name
the problem and the fix when they cannot be loaded (written to kill surviving mutants of
``training/checkpoint.py``)."""

import json

import pytest
import torch

from depthlens.errors import CheckpointError
from depthlens.training.checkpoint import JSON_NAME, TENSORS_NAME, load_checkpoint, save_checkpoint


def _setup(seed):
    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 2)
    optimizers = [torch.optim.Adam([module.weight], lr=0.1), torch.optim.SGD([module.bias], lr=0.1, momentum=0.9)]
    return module, optimizers


def _step(module, optimizers, x):
    for optimizer in optimizers:
        optimizer.zero_grad()
    module(x).square().sum().backward()
    for optimizer in optimizers:
        optimizer.step()


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_a_round_trip_restores_every_optimizer_entry_and_resumes_identically(tmp_path):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    module, optimizers = _setup(0)
    for _ in range(3):
        _step(module, optimizers, x)
    weight_state = optimizers[0].state[module.weight]
    weight_state["count"] = 3                      # non-tensor entries go to the JSON (torch's own
    # load_state_dict mangles strings, so numbers only)
    weight_state["ema.slow.v"] = torch.arange(6.0).reshape(2, 3)   # a key with dots
    optimizers[1].state[module.bias]["seen"] = 1.5
    save_checkpoint(tmp_path / "checkpoint", module, optimizers, {"step": 3})

    other, other_optimizers = _setup(1)
    assert load_checkpoint(tmp_path / "checkpoint", other, other_optimizers) == {"step": 3}
    for key, value in module.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    for mine, theirs in zip(optimizers, other_optimizers):
        saved, loaded = mine.state_dict(), theirs.state_dict()
        assert json.loads(json.dumps(saved["param_groups"])) == loaded["param_groups"]   # tuples come back as lists
        assert saved["state"].keys() == loaded["state"].keys()
        for param_id in saved["state"]:
            _assert_same_state(saved["state"][param_id], loaded["state"][param_id])
    assert other_optimizers[0].state[other.weight]["count"] == 3
    assert other_optimizers[1].state[other.bias]["seen"] == 1.5

    _step(module, optimizers, x)
    _step(other, other_optimizers, x)
    for key, value in module.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_loading_restores_the_random_state(tmp_path):
    module, optimizers = _setup(0)
    torch.manual_seed(11)
    save_checkpoint(tmp_path / "checkpoint", module, optimizers, {"step": 0})
    expected = torch.rand(5)
    torch.rand(7)
    load_checkpoint(tmp_path / "checkpoint", module, optimizers)
    assert torch.equal(torch.rand(5), expected)


def test_a_damaged_checkpoint_names_the_problem_and_the_fix(tmp_path):
    module, optimizers = _setup(0)
    folder = save_checkpoint(tmp_path / "checkpoint", module, optimizers, {"step": 1})
    (folder / TENSORS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint in .* is damaged \(.*\); start without --resume"):
        load_checkpoint(folder, module, optimizers)
    folder = save_checkpoint(tmp_path / "other", module, optimizers, {"step": 1})
    (folder / JSON_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(folder, module, optimizers)


def test_another_number_of_optimizers_names_the_problem_and_the_fix(tmp_path):
    module, optimizers = _setup(0)
    save_checkpoint(tmp_path / "checkpoint", module, optimizers, {"step": 1})
    with pytest.raises(CheckpointError, match="was made with other optimizer settings; start without --resume"):
        load_checkpoint(tmp_path / "checkpoint", module, optimizers[:1])


def test_another_model_names_the_fix(tmp_path):
    module, optimizers = _setup(0)
    save_checkpoint(tmp_path / "checkpoint", module, optimizers, {"step": 1})
    large = torch.nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match=r"; start without --resume, or pass the --out of a run with these settings$"):
        load_checkpoint(tmp_path / "checkpoint", large, [torch.optim.Adam([large.weight]), torch.optim.SGD([large.bias])])


def test_a_finished_checkpoint_restores_the_module_and_leaves_the_optimizers(tmp_path):
    module, optimizers = _setup(0)
    _step(module, optimizers, torch.ones(2, 3))
    save_checkpoint(tmp_path / "checkpoint", module, [], {"step": 1, "complete": True})
    other, other_optimizers = _setup(1)
    assert load_checkpoint(tmp_path / "checkpoint", other, other_optimizers) == {"step": 1, "complete": True}
    assert torch.equal(other.weight, module.weight)
    assert all(not optimizer.state for optimizer in other_optimizers)
