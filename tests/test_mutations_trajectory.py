"""Trajectory memory against the README's figures: 512 tokens of a 33-layer model with k = 10
take 2.5 MB, and the working memory is a handful of ``[chunk_tokens, vocab]`` float32 buffers
(64 MiB each by default) whatever the text length."""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from depthlens import LogitLens, capture
from depthlens.analysis import cells
from depthlens.analysis.trajectory import Trajectory

MIB = 2**20
BUFFERS = 8
"""Working memory allowed, in ``[chunk_tokens, vocab]`` float32 buffers: measured at 7."""


def test_512_tokens_of_33_layers_with_k_10_take_2_5_mb():
    deep = dict(num_hidden_layers=33, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512)
    model = tiny_model("llama", **deep)
    ids = torch.randint(0, 320, (1, 512), generator=torch.Generator().manual_seed(0))
    trajectory = Trajectory.from_ids(model, LogitLens(model), ids, k=10)
    assert 2.45e6 <= trajectory.nbytes <= 2.55e6, trajectory.nbytes
    cells_bytes = 34 * 512 * (12 * 10 + 24)  # rows × tokens × (k ids and probabilities, 3 statistics, rank, prob)
    assert trajectory.nbytes == pytest.approx(cells_bytes, rel=0.01)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _mmap_large_allocations() -> None:
    """Make glibc serve every allocation of 128 kB or more with its own mapping, returned on free
    (its default before it adapts the threshold), so that the resident set follows the memory
    actually in use rather than how fragmented the heap got in earlier tests."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    libc.malloc_trim(0)


def _peak_growth_mib(run) -> float:
    """Peak resident-set growth (MiB) while ``run()`` runs, measured in a forked child (where no
    other thread of the test session allocates): the kernel's high-water mark is reset just
    before, so it sees every allocation torch makes. The least of three runs."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            _mmap_large_allocations()
            peaks = []
            for _ in range(3):
                gc.collect()
                before = _status_kib("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")
                result = run()
                peaks.append((_status_kib("VmHWM") - before) / 1024)
                del result
            os.write(write_end, repr(min(peaks)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return float(answer)


def _can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux's /proc/self/clear_refs to measure peak memory")
def test_working_memory_is_a_handful_of_chunk_buffers(monkeypatch):
    """The default chunk holds CHUNK_ELEMENTS logits (256 MiB); here it is scaled down to 4 MiB so
    that the check runs in seconds: 512 tokens at a 32k vocabulary go in chunks of 32 tokens. The
    peak stays under BUFFERS such buffers; without chunking it would be over 300 MiB."""
    assert cells.CHUNK_ELEMENTS * 4 == 256 * MIB
    monkeypatch.setattr(cells, "CHUNK_ELEMENTS", MIB)
    vocab = 32768
    model = tiny_model("llama", vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=512)
    ids = torch.randint(0, vocab, (1, 512), generator=torch.Generator().manual_seed(0))
    states = capture(model, ids)
    lens = LogitLens(model)
    buffer_mib = MIB * 4 / MIB
    peak = _peak_growth_mib(lambda: Trajectory.from_states(lens, states, k=10))
    assert peak <= BUFFERS * buffer_mib, f"peak {peak:.1f} MiB, {buffer_mib:.0f} MiB per buffer"
    explicit = _peak_growth_mib(lambda: Trajectory.from_states(lens, states, k=10, chunk_tokens=16))
    assert explicit <= BUFFERS * buffer_mib / 2 + 2, f"peak {explicit} MiB with 16-token chunks"
