"""Trajectories and lens divergences, pinned against direct full-vocabulary computation."""

import math

import pandas as pd
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from depthlens import DataError, LogitLens, TunedLens, capture
from depthlens.analysis.compare import compare_lenses
from depthlens.analysis.trajectory import (
    STATISTICS,
    Trajectory,
    TrajectoryError,
)
from depthlens.stats import fused
from depthlens.text.encode import encode

ROW_SUMS = fused.row_sums
TEXTS = ["Fair is foul, and foul is fair: hover through the fog", "When shall we three meet"]




@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", initializer_range=0.4)


@pytest.fixture(scope="module")
def tuned(model):
    lens = TunedLens(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.normal_(0, 0.3, generator=generator)
            translator.bias.normal_(0, 1.0, generator=generator)
    return lens


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    return encode(tiny_tokenizer, TEXTS)


@pytest.fixture(scope="module")
def states(model, batch):
    return capture(model, *batch)


def _direct(lens, states, mask):
    """Every statistic from the full [layers, batch, seq, vocab] distributions, in float64."""
    logits = lens.stack_logits(states).double()
    logits[-1] = states.logits.double()
    log_q = logits.log_softmax(-1)
    log_p = states.logits.double().log_softmax(-1)
    q = log_q.exp()
    final_top1 = states.logits.argmax(-1)
    next_ids = states.input_ids[:, 1:]
    ce = torch.full(q.shape[:-1], math.nan, dtype=torch.float64)
    ce[:, :, :-1] = -log_q[:, :, :-1].gather(-1, next_ids[None, ..., None].expand(len(q), -1, -1, 1)).squeeze(-1)
    ce[:, ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)] = math.nan
    threshold = logits.gather(-1, final_top1[None, ..., None].expand(len(q), -1, -1, 1))
    return {
        "entropy": -(q * log_q).sum(-1),
        "kl": (log_p.exp() * (log_p - log_q)).sum(-1),
        "ce": ce,
        "rank": (logits > threshold).sum(-1).double(),
        "prob": q.amax(-1),
        "top": q.topk(4, dim=-1),
    }


@pytest.mark.parametrize("lens_kind", ["logit", "tuned"])
@pytest.mark.parametrize(("chunk_tokens", "kernel"), [(None, "0"), (6, "0"), (None, "1"), (6, "1")])
def test_statistics_match_direct_computation(model, tuned, states, batch, lens_kind, chunk_tokens, kernel,
                                             monkeypatch):
    """Eager passes and the compiled kernel (``DEPTHLENS_FUSED``), in one window or in windows of
    6 positions, against float64 statistics of the whole distributions."""
    monkeypatch.setenv(fused.FUSED_ENV, kernel)
    calls = []
    monkeypatch.setattr(fused, "row_sums", lambda *args: calls.append(1) or ROW_SUMS(*args))
    lens = LogitLens(model) if lens_kind == "logit" else tuned
    mask = batch[1]
    traj = Trajectory.from_states(lens, states, mask, k=4, chunk_tokens=chunk_tokens)
    direct = _direct(lens, states, mask)
    assert traj.layers == (0, 1, 2, 3) and traj.num_layers == 3
    assert traj.top_ids.shape == (4, 2, mask.shape[1], 4)
    for name in STATISTICS:
        got, want = traj.stat(name).double()[:, mask], direct[name][:, mask]
        assert torch.allclose(got, want, atol=2e-4, rtol=1e-4, equal_nan=True), name
    assert torch.equal(traj.top_ids[:, mask], direct["top"].indices[:, mask])
    assert torch.allclose(traj.top_probs[:, mask].double(), direct["top"].values[:, mask], atol=1e-6)
    assert torch.equal(traj.max_prob[:, mask], traj.top_probs[:, mask][..., 0])
    assert bool(calls) == (kernel == "1")


def test_output_row_is_the_model_and_ranks_are_meaningful(model, tuned, states, batch):
    mask = batch[1]
    traj = Trajectory.from_states(tuned, states, mask)
    assert torch.equal(traj.top_ids[-1, ..., 0][mask], states.logits.argmax(-1)[mask])
    assert (traj.kl_to_final[-1][mask].abs() < 1e-5).all()
    assert (traj.final_top1_rank[-1][mask] == 0).all()
    agree = traj.top_ids[..., 0] == states.logits.argmax(-1)
    assert torch.equal(traj.final_top1_rank[:, mask] == 0, agree[:, mask])
    assert (traj.final_top1_rank[:-1][mask.expand(3, -1, -1)] > 0).any()


def test_padding_and_the_last_position_have_no_statistics(model, states, batch):
    mask = batch[1]
    traj = Trajectory.from_states(LogitLens(model), states, mask)
    length = int(mask[1].sum())
    assert length < mask.shape[1]
    assert traj.ce[:, 1, length - 1].isnan().all() and traj.ce[:, 0, -1].isnan().all()
    assert not traj.ce[:, 1, : length - 1].isnan().any()
    assert traj.entropy[:, 1, length:].isnan().all() and (traj.top_ids[:, 1, length:] == -1).all()
    assert not traj.entropy[:, 0].isnan().any()


def test_padded_batch_equals_texts_one_at_a_time(model, tiny_tokenizer):
    lens = LogitLens(model)
    together = Trajectory.from_text(model, tiny_tokenizer, lens, TEXTS, k=3)
    alone = Trajectory.from_text(model, tiny_tokenizer, lens, TEXTS[1], k=3)
    length = alone.input_ids.shape[1]
    assert torch.equal(together.top_ids[:, 1, :length], alone.top_ids[:, 0])
    assert torch.allclose(together.kl_to_final[:, 1, :length], alone.kl_to_final[:, 0], atol=1e-5, equal_nan=True)
    assert together.input_labels(1) == alone.input_labels(0)


def test_divergences_use_the_true_definitions(model, tuned, states, batch):
    mask = batch[1]
    divergence = compare_lenses(LogitLens(model), tuned, states, mask, chunk_tokens=5)
    log_p = LogitLens(model).stack_logits(states).double().log_softmax(-1)
    log_q = tuned.stack_logits(states).double().log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    m = (p + q) / 2
    kl = (p * (log_p - log_q)).sum(-1)
    js = 0.5 * (p * (log_p - m.log())).sum(-1) + 0.5 * (q * (log_q - m.log())).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    for got, want in ((divergence.kl, kl), (divergence.js, js), (divergence.tv, tv)):
        assert torch.allclose(got[:, mask].double(), want[:, mask], atol=1e-5, rtol=1e-4)
        assert got[:, ~mask].isnan().all()
    assert (divergence.js[:, mask] <= math.log(2)).all() and (divergence.tv[:, mask] <= 1).all()
    assert (divergence.js[:-1][:, mask] > 0.01).all()
    assert (divergence.kl[-1][mask] < 1e-5).all()
    sym_kl = 0.5 * (kl + (q * (log_q - log_p)).sum(-1))
    assert not torch.allclose(divergence.js[:-1][:, mask].double(), sym_kl[:-1][:, mask], atol=1e-3)


def test_layer_selection_keeps_the_output_row(model, states):
    traj = Trajectory.from_states(LogitLens(model), states, layers=[2, 0])
    assert traj.layers == (0, 2, 3)
    full = Trajectory.from_states(LogitLens(model), states)
    assert torch.equal(traj.top_ids, full.top_ids[[0, 2, 3]])
    assert full.strided(2).layers == (0, 2, 3)
    assert torch.equal(full.strided(2).entropy, traj.entropy)
    with pytest.raises(TrajectoryError, match="out of range"):
        Trajectory.from_states(LogitLens(model), states, layers=[4])


def test_tidy_dataframe_and_csv(model, tiny_tokenizer, tmp_path):
    traj = Trajectory.from_text(model, tiny_tokenizer, LogitLens(model), TEXTS, k=2)
    frame = traj.to_dataframe()
    cells = int(traj.attention_mask.sum()) * len(traj.layers)
    assert list(frame.columns) == ["lens", "layer", "batch", "position", "token", "prediction", "statistic", "value"]
    assert len(frame) == cells * len(STATISTICS)
    row = frame[(frame.layer == 1) & (frame.batch == 1) & (frame.position == 2) & (frame.statistic == "kl")]
    assert row.value.item() == pytest.approx(traj.kl_to_final[1, 1, 2].item())
    assert row.token.item() == traj.input_labels(1)[2]
    assert row.prediction.item() == traj.top1_labels(1)[1][2]
    path = traj.to_csv(tmp_path / "out" / "table.csv")
    back = pd.read_csv(path, keep_default_na=False, na_values=[""])
    assert len(back) == len(frame) and [p.name for p in path.parent.iterdir()] == ["table.csv"]


def test_summary_names_every_row(model, tiny_tokenizer):
    traj = Trajectory.from_text(model, tiny_tokenizer, LogitLens(model), TEXTS[0])
    lines = traj.summary().splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["0", "1", "2", "output"]
    assert lines[-1].split()[-1] == traj.top1_labels(0, 12)[-1][-1]


def test_bad_input_is_reported(model, tiny_tokenizer, states):
    with pytest.raises(DataError, match="empty"):
        encode(tiny_tokenizer, "  \n")
    with pytest.raises(TrajectoryError, match="unknown statistic 'bogus'"):
        Trajectory.from_states(LogitLens(model), states).stat("bogus")
    with pytest.raises(DataError, match="reads at most 128"):
        Trajectory.from_ids(model, LogitLens(model), torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(TrajectoryError, match="k must be"):
        Trajectory.from_states(LogitLens(model), states, k=VOCAB + 1)


def test_stored_size_is_small_and_independent_of_the_vocabulary():
    """33 layers, 512 tokens, k=10 stay far under 50 MB; full float32 log-probabilities at a
    131072-token vocabulary would take 9.1 GB. The size is shown not to depend on the vocabulary
    on a short text, which keeps the test fast (512 tokens x 131072 logits x 34 layers is 2.3e9
    logits)."""
    deep = dict(num_hidden_layers=33, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512)
    ids = torch.randint(0, VOCAB, (1, 512), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for vocab in (VOCAB, 131072):
        model = tiny_model("llama", vocab_size=vocab, **deep)
        sizes[vocab] = Trajectory.from_ids(model, LogitLens(model), ids[:, :8], k=10).nbytes
    assert sizes[VOCAB] == sizes[131072]
    model = tiny_model("llama", **deep)
    traj = Trajectory.from_ids(model, LogitLens(model), ids, k=10)
    assert traj.top_ids.shape == (34, 1, 512, 10)
    assert traj.nbytes < 50e6 < 34 * 512 * 131072 * 4 / 100
