"""LogitStatistics, eager and compiled: every score pinned to the plain definitions of
depthlens.stats.divergences, with -inf entries, ties, row blocks and the group sums."""

import math

import pytest
import torch

from depthlens.errors import UsageError
from depthlens.stats import fused, logit_statistics
from depthlens.stats.divergences import cross_entropy, entropy, kl, log_probs
from depthlens.stats.logit_statistics import LogitStatistics, top_k

PATHS = pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])


@pytest.fixture(autouse=True)
def _the_kernel_really_ran(request):
    """A test of the compiled path must not pass on the eager fallback: the kernel compiled."""
    yield
    if getattr(request.node, "callspec", None) and request.node.callspec.params.get("compiled"):
        assert fused._worked and not fused._failed, "the compiled kernel fell back to the eager passes"


@PATHS
@pytest.mark.parametrize("impossible", [False, True])
def test_statistics_equal_the_plain_definitions(impossible, compiled):
    generator = torch.Generator().manual_seed(5)
    reference = torch.randn(6, 50, generator=generator) * 4
    layer = torch.randn(6, 50, generator=generator) * 4
    if impossible:  # one row where the layer rules out tokens, one where the reference does
        layer[1, 10:20] = -math.inf
        reference[2, :5] = -math.inf
        layer[2, 30:] = -math.inf
        layer[5] = reference[5]  # both rule out the same tokens: recomputed exactly, KL 0
        layer[5, :3] = reference[5, :3] = -math.inf
    targets = torch.tensor([3, 11, 40, -1, 0, 49])
    scores = LogitStatistics(reference, targets, fused=compiled)(layer)
    log_p, log_q = log_probs(reference), log_probs(layer)
    assert torch.allclose(scores.entropy, entropy(log_q), atol=1e-5)
    assert torch.allclose(scores.kl, kl(log_p, log_q).clamp_min(0), atol=1e-5)
    assert torch.allclose(scores.ce, cross_entropy(log_q, targets), atol=1e-5, equal_nan=True)
    shift = layer.amax(-1, keepdim=True)
    assert torch.allclose(layer - shift - scores.log_normaliser[:, None], log_q, atol=1e-5)
    assert torch.equal(scores.rank, (layer > layer.gather(-1, reference.argmax(-1, keepdim=True))).sum(-1))
    capped = LogitStatistics(reference, targets, fused=compiled)(layer, ranks=False).rank
    assert torch.equal(capped, scores.rank.clamp_max(1)) and scores.rank.max() > 1
    assert torch.isfinite(scores.entropy).all() and scores.ce[3].isnan()
    if impossible:
        assert scores.ce[1] == math.inf and scores.kl[1] == math.inf and scores.kl[5] < 1e-6


@PATHS
def test_statistics_of_the_reference_itself_are_zero_kl(compiled):
    logits = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(6))
    statistics = LogitStatistics(logits, torch.full((4, 3), -1), fused=compiled)
    scores = statistics(logits)
    assert scores.kl.shape == (12,) and (scores.kl < 1e-5).all() and (scores.rank == 0).all()
    assert (statistics(logits, ranks=False).rank == 0).all() and (statistics(logits, k=1, ranks=False).rank == 0).all()
    assert scores.top_logits.shape == (12, 0) and scores.top_ids.shape == (12, 0) and scores.top_ids.dtype == torch.long
    with_top = statistics(logits, k=2)
    expected = logits.reshape(12, 50).topk(2)
    assert torch.equal(with_top.top_logits, expected.values) and torch.equal(with_top.top_ids, expected.indices)


@pytest.mark.parametrize("vocab", [50, 128 * 6, 128 * 40 + 17])
def test_top_k_equals_torch_topk(vocab):
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[3, -1] = 50.0  # the largest entry in the short last run
    logits[4, :5] = 40.0 + torch.arange(5.0)  # all of the top k in one run
    values, ids = top_k(logits, 5)
    expected = logits.topk(5, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(ids, expected.indices)


@pytest.mark.parametrize(("block_rows", "compiled"), [(1, False), (2, False), (5, False), (7, False), (7, True)])
def test_statistics_in_blocks_and_their_mixture(monkeypatch, block_rows, compiled):
    """Eager passes take rows in blocks of 1, 2, 5 or all 7 (``BLOCK_FLOATS``), the compiled
    kernel all at once; every row's distribution is added to its group's sum, and the top-k comes
    from the runs' maxima across a short last run (vocabulary 128 · 3 + 17)."""
    monkeypatch.setattr(logit_statistics, "BLOCK_FLOATS", block_rows * 401)
    monkeypatch.setattr(logit_statistics, "MIN_BLOCK_ROWS", 1)
    generator = torch.Generator().manual_seed(8)
    reference, layer = torch.randn(2, 7, 401, generator=generator) * 3
    layer[3, -2] = 30.0
    targets = torch.randint(0, 401, (7,), generator=generator)
    groups = torch.tensor([2, 0, 0, 1, 2, 2, 0])
    sums = torch.ones(3, 401)
    scores = LogitStatistics(reference, targets, fused=compiled)(layer, k=4, into=(groups, sums))
    log_q = log_probs(layer)
    assert torch.allclose(scores.kl, kl(log_probs(reference), log_q).clamp_min(0), atol=1e-5)
    assert torch.allclose(scores.entropy, entropy(log_q), atol=1e-5)
    assert torch.allclose(sums, torch.ones(3, 401).index_add(0, groups, log_q.exp()), atol=1e-5)
    assert torch.equal(scores.top_ids, layer.topk(4, dim=-1).indices)


@PATHS
def test_ties_at_the_maximum_share_the_top1_agreement(compiled):
    """Top-1 agreement is |T_q ∩ T_p| / max(|T_q|, |T_p|) for the tokens tied at each maximum: 1/m
    where the reference's top-1 is one of m tokens tied in the layer (a tie is not agreement), 0
    below the maximum, 1 or 0 without ties, and 1 for the reference against itself even where it
    ties (bfloat16 logits of the model's own output do). Planted bug: ties counted as agreement."""
    reference = torch.tensor([[5.0, 1.0, 0.0, 0.0], [0.0, 5.0, 1.0, 0.0], [1.0, 0.0, 0.0, 5.0], [5.0, 0.0, 0.0, 0.0],
                              [4.0, 4.0, 1.0, 0.0], [4.0, 4.0, 1.0, 0.0], [0.0, 4.0, 4.0, 4.0]])
    layer = torch.tensor([[2.0, 2.0, 1.0, 0.0], [3.0, 3.0, 3.0, 0.0], [1.0, 0.0, 4.0, 4.0], [0.0, 2.0, 2.0, 1.0],
                          [4.0, 4.0, 1.0, 0.0], [4.0, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    no_targets = torch.full((7,), -1)
    scores = LogitStatistics(reference, no_targets, fused=compiled)(layer, ranks=False)
    assert scores.top1_share.tolist() == pytest.approx([0.5, 1 / 3, 0.5, 0.0, 1.0, 0.5, 2 / 3], abs=1e-7)
    assert scores.rank.tolist() == [0, 0, 0, 1, 0, 0, 1]
    assert LogitStatistics(reference, no_targets, fused=compiled)(layer).top1_share is None
    itself = LogitStatistics(reference, no_targets, fused=compiled)(reference, ranks=False)
    assert itself.top1_share.tolist() == [1.0] * 7  # the reference agrees with itself, ties and all


@PATHS
def test_a_maximum_in_the_short_last_run_is_the_rows_maximum(compiled):
    """The kernel takes a row's maximum from its runs' maxima and the short last run's (vocabulary
    128 · 2 + 5): a maximum tied twice in that last run gives a layer tie count of 2, so a reference
    whose top-1 is one of them shares half the top-1 agreement, and a maximum 120 above every run's
    keeps the entropy finite (``exp`` of the unshifted 120 overflows). Planted bug: the last run
    left out of the maximum."""
    generator = torch.Generator().manual_seed(12)
    layer = torch.randn(2, 261, generator=generator)
    layer[0, 257] = layer[0, 259] = 6.0
    layer[1, 260] = 120.0
    reference = torch.zeros(2, 261)
    reference[0, 259] = reference[1, 260] = 5.0
    scores = LogitStatistics(reference, torch.tensor([257, 3]), fused=compiled)(layer, ranks=False)
    log_q = log_probs(layer)
    assert scores.top1_share.tolist() == pytest.approx([0.5, 1.0], abs=1e-7)
    assert torch.allclose(scores.entropy, entropy(log_q), atol=1e-5)
    assert torch.allclose(scores.kl, kl(log_probs(reference), log_q), atol=1e-4)
    assert torch.allclose(scores.log_normaliser, torch.logsumexp(layer - layer.amax(-1, keepdim=True), -1), atol=1e-6)


def test_the_compiled_kernel_reads_bfloat16_logits_as_the_eager_passes_read_their_float32_copy():
    """bfloat16 logits (the decoding's output where products run in bfloat16) go into the kernel
    without a float32 copy; every float32 score agrees with the eager path's to float32 rounding
    of sums over 3000 terms of size up to ~20 nats (1e-4), ranks and top-k exactly."""
    generator = torch.Generator().manual_seed(11)
    reference = torch.randn(20, 3000, generator=generator) * 3
    layer = (torch.randn(20, 3000, generator=generator) * 3).bfloat16()
    targets = torch.randint(-1, 3000, (20,), generator=generator)
    groups, eager_sums, fused_sums = torch.arange(20) % 3, torch.zeros(3, 3000), torch.zeros(3, 3000)
    eager = LogitStatistics(reference, targets)(layer, k=5)
    compiled = LogitStatistics(reference, targets, fused=True)(layer, k=5)
    for name in ("entropy", "kl", "ce", "log_normaliser", "top_logits"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), atol=1e-4, rtol=0, equal_nan=True)
    assert torch.equal(compiled.rank, eager.rank) and torch.equal(compiled.top_ids, eager.top_ids)
    LogitStatistics(reference, targets)(layer, into=(groups, eager_sums), ranks=False)
    LogitStatistics(reference, targets, fused=True)(layer, into=(groups, fused_sums), ranks=False)
    torch.testing.assert_close(fused_sums, eager_sums, atol=1e-6, rtol=1e-5)


def test_a_kernel_that_cannot_be_compiled_falls_back_to_the_eager_passes_with_one_warning(monkeypatch, capsys):
    """The first compile failing (no C++ compiler, say) prints one line naming the fix, the scores
    are the eager ones, and ``fused_wanted`` says no from then on. Planted bug: the failure raised."""
    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fused, "_compiled", lambda into: broken)
    monkeypatch.setattr(fused, "_worked", False)
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    generator = torch.Generator().manual_seed(12)
    reference, layer = torch.randn(2, 5, 60, generator=generator)
    statistics = LogitStatistics(reference, torch.zeros(5, dtype=torch.long), fused=True)
    scores, again = statistics(layer, k=2), statistics(layer)
    expected = LogitStatistics(reference, torch.zeros(5, dtype=torch.long))(layer, k=2)
    assert torch.equal(scores.kl, expected.kl) and torch.equal(scores.top_ids, expected.top_ids)
    assert torch.equal(again.kl, expected.kl)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "RuntimeError" in lines[0] and f"{fused.FUSED_ENV}=0" in lines[0]
    assert not fused.fused_wanted(2**40)


def test_the_kernel_is_wanted_for_large_work_on_a_cpu_with_a_compiler(monkeypatch):
    """Large work on the CPU with a compiler: yes; small work, another device, no compiler: no;
    ``DEPTHLENS_FUSED`` overrides the size, and a bad value is refused in one line."""
    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(fused, "_compiler_found", lambda: True)
    big, small = fused.MIN_FUSED_LOGITS, fused.MIN_FUSED_LOGITS - 1
    assert fused.fused_wanted(big) and not fused.fused_wanted(small) and not fused.fused_wanted(big, "meta")
    monkeypatch.setenv(fused.FUSED_ENV, "1")
    assert fused.fused_wanted(small)
    monkeypatch.setenv(fused.FUSED_ENV, "0")
    assert not fused.fused_wanted(big)
    monkeypatch.setenv(fused.FUSED_ENV, "yes")
    with pytest.raises(UsageError, match=rf"^{fused.FUSED_ENV} must be 1 or 0, got 'yes'"):
        fused.fused_wanted(big)
    monkeypatch.delenv(fused.FUSED_ENV)
    monkeypatch.setattr(fused, "_compiler_found", lambda: False)
    assert not fused.fused_wanted(big)
