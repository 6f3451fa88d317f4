"""The torchrun process group: training leaves the group it opened, and only that one."""

import torch.distributed as dist

from depthlens.training.processes import Processes

REAL_INIT = dist.init_process_group


def _one_process_group(tmp_path):
    """A real gloo group of one process (a world of 2 would wait for a second one)."""
    REAL_INIT("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


def test_the_group_a_run_opens_is_closed(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: _one_process_group(tmp_path))
    procs = Processes()
    assert dist.is_initialized() and procs.owns_group
    procs.close()
    assert not dist.is_initialized()


def test_a_group_the_caller_made_is_left_open(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    _one_process_group(tmp_path)
    try:
        procs = Processes()
        procs.close()
        assert dist.is_initialized() and not procs.owns_group
    finally:
        dist.destroy_process_group()
