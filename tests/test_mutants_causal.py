"""Causal checks: exact answers for what the main causal tests leave open.

Small hand-built cases (a linear readout, a readout blind to every direction, diagonal surrogates),
boundaries of the argument checks with their messages, the bases file format, and the paths the
other causal tests do not take (alignment with a target layer, several batches, the surrogate
start of the batched search, vocabulary shortlists).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import LinearReadout, random_tuned_lens, tiny_model

from depthlens import LogitLens, TunedLens, capture
from depthlens.analysis.causal import (
    CausalBasis,
    causal_fidelity,
    check_directions,
    check_readout,
    check_statistics,
    extract_basis,
    load_bases,
    prepare,
    save_bases,
    stimulus_response,
)
from depthlens.analysis.causal.alignment import _summarise, aitchison_similarity
from depthlens.analysis.causal.erasure import block_kl, shortlist
from depthlens.analysis.causal.fidelity import Fidelity, ranks
from depthlens.analysis.causal.search import (
    _fit_surrogate,
    _surrogate,
    batched_search,
    brockett_weights,
    energy_captured,
    orthonormal_rows,
    score_samples,
    sequential_search,
)
from depthlens.errors import CausalError
from depthlens.lenses.lens_file import fingerprint
from depthlens.lenses.readout import model_parts
from depthlens.stats.bootstrap import group_bootstrap

IDS = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def model():
    """Far-from-uniform predictions, so KLs are well above float32 rounding."""
    return tiny_model("llama", initializer_range=0.3)


@pytest.fixture(scope="module")
def blind_to_all(model) -> TunedLens:
    """A tuned lens whose translator at every layer is ``−I`` (no bias): ``h + (−I h) = 0``
    exactly, so its output does not depend on the state at all."""
    lens = TunedLens(model)
    d = lens.parts.d_model
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.copy_(-torch.eye(d))
            translator.bias.zero_()
    return lens


# --- alignment --------------------------------------------------------------------------------


def test_aitchison_similarity_of_one_composition_without_a_batch_axis():
    """A 1-D log-ratio vector (no leading axis) works: cos of ``clr(x)`` with itself is 1 and with
    ``(1, 0, −1) ↦ (−1, 0, 1)`` it is −1; ``(1, −1, 0)`` vs ``(1, 0, −1)`` gives 1/2 (uniform w)."""
    x = torch.tensor([1.0, 0.0, -1.0])
    assert float(aitchison_similarity(x, x)) == pytest.approx(1.0)
    assert float(aitchison_similarity(x, -x)) == pytest.approx(-1.0)
    assert float(aitchison_similarity(torch.tensor([1.0, -1.0, 0.0]), x)) == pytest.approx(0.5)


def test_summarise_averages_over_directions_and_bootstraps_groups_of_positions():
    """Two directions' summed similarities over 8 positions in groups of 4: the mean is the sum
    over 2·8; the interval is the group bootstrap of the two groups' sums over their 4 tokens."""
    table = torch.tensor([[0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.8]])
    result = _summarise([2], {"a": table.clone()}, 2, 4, None)
    assert result.similarity["a"] == [pytest.approx(7.4 / 16)]
    low, high = group_bootstrap(torch.tensor([2.0, 5.4], dtype=torch.float64) / 2,
                                torch.tensor([4.0, 4.0], dtype=torch.float64))
    assert result.low["a"] == [pytest.approx(low)] and result.high["a"] == [pytest.approx(high)]
    assert result.target == "output"
    assert result.summary() == {"layers": [2], "target": "output", "similarity": result.similarity,
                                "low": result.low, "high": result.high}


def test_summarise_with_groups_of_one_token_and_with_a_single_group():
    """Group size 1 makes every position a group; one group (size ≥ positions) has no interval."""
    table = torch.tensor([[0.1, 0.5, 0.3]])
    result = _summarise([1], {"a": table.clone()}, 1, 1, 3)
    low, high = group_bootstrap(table[0].double(), torch.ones(3, dtype=torch.float64))
    assert (result.low["a"][0], result.high["a"][0]) == (pytest.approx(low), pytest.approx(high))
    assert result.target == "layer 3"
    single = _summarise([1], {"a": table.clone()}, 1, 3, None)
    assert math.isnan(single.low["a"][0]) and math.isnan(single.high["a"][0])
    assert single.similarity["a"][0] == pytest.approx(0.3)
    two = _summarise([1], {"a": table.clone()}, 1, 2, None)  # exactly 2 groups: an interval exists
    assert math.isfinite(two.low["a"][0]) and math.isfinite(two.high["a"][0])


def test_alignment_against_the_readout_at_the_last_layer_is_alignment_against_the_output(model):
    """The logit lens at layer L and a tuned lens (identity at L) decode ``resid.L`` exactly as
    the model does, so ``target = L`` gives the output's similarities (float32 rounding apart)."""
    readouts = {"logit": LogitLens(model), "tuned": random_tuned_lens(model, seed=1, std=0.2)}
    output = stimulus_response(model, readouts, IDS, [1], directions=2, group_tokens=8)
    last = stimulus_response(model, readouts, IDS, [1], directions=2, group_tokens=8, target=3)
    assert output.target == "output" and last.target == "layer 3"
    for name in readouts:
        assert last.similarity[name][0] == pytest.approx(output.similarity[name][0], abs=1e-4)
        assert last.low[name][0] == pytest.approx(output.low[name][0], abs=1e-4)
        assert abs(output.similarity[name][0]) > 1e-2  # not a trivial 0 = 0


def test_alignment_is_the_same_in_batches_of_one_row(model):
    """Cutting the 4 rows into batches of 1 fills each batch's own positions: same numbers."""
    readouts = {"logit": LogitLens(model)}
    whole = stimulus_response(model, readouts, IDS, [1], directions=1, group_tokens=8, batch_size=4)
    rows = stimulus_response(model, readouts, IDS, [1], directions=1, group_tokens=8, batch_size=1)
    assert rows.similarity["logit"][0] == pytest.approx(whole.similarity["logit"][0], abs=1e-5)
    assert rows.high["logit"][0] == pytest.approx(whole.high["logit"][0], abs=1e-5)


def test_a_readout_blind_to_every_direction_has_zero_alignment(model, blind_to_all):
    """Its stimulus is exactly 0, its clr cosine 0/0: counted as 0, not NaN and not 1."""
    result = stimulus_response(model, {"blind": blind_to_all}, IDS, [1], directions=1, group_tokens=8)
    assert result.similarity["blind"] == [0.0]
    assert result.low["blind"] == [0.0] and result.high["blind"] == [0.0]


# --- fidelity ---------------------------------------------------------------------------------


def test_ranks_average_ties_along_the_last_axis_of_a_batch():
    """Ranks 0 … k−1 per row of a ``[2, 2, 4]`` batch, ties sharing the mean of their ranks."""
    values = torch.tensor([[[3.0, 1.0, 2.0, 0.0], [5.0, 5.0, 1.0, 7.0]],
                           [[1.0, 1.0, 1.0, 2.0], [0.0, 4.0, 3.0, 2.0]]])
    expected = torch.tensor([[[3.0, 1.0, 2.0, 0.0], [1.5, 1.5, 0.0, 3.0]],
                             [[1.0, 1.0, 1.0, 3.0], [0.0, 3.0, 2.0, 1.0]]], dtype=torch.float64)
    assert torch.equal(ranks(values), expected)
    assert torch.equal(ranks(values[1, 0]), expected[1, 0])


def test_check_statistics_boundaries_and_messages():
    """4 groups is the least accepted (13 tokens in groups of 4 make 4), 3 directions the fewest."""
    check_statistics(13, 4, 3)
    check_statistics(4, 1, 3)
    check_statistics(4, 0, 3)  # a group size below 1 counts as 1
    with pytest.raises(CausalError, match="12 positions make 3 groups of 4 tokens, but the bootstrap needs at "
                                          "least 4: use more tokens or a smaller group size"):
        check_statistics(12, 4, 3)
    with pytest.raises(CausalError, match="3 positions make 3 groups"):
        check_statistics(3, 1, 3)
    with pytest.raises(CausalError, match="k = 2 directions means nothing: use k ≥ 3"):
        check_statistics(64, 8, 2)


def test_fidelity_summary_rounds_to_micronats():
    """Every key, and KLs rounded to 6 decimals; the two directions are in opposite orders on the two
    sides, so every resample over directions that draws both gives ρ = −1."""
    fidelity = Fidelity(2, torch.tensor([0.12345678, 1.0]), torch.tensor([2.5, 0.00000049]), 0.5, 0.1, 0.9)
    summary = fidelity.summary()
    assert summary == {"layer": 2, "rho": 0.5, "rho_low": 0.1, "rho_high": 0.9,
                       "rho_directions_low": pytest.approx(-1.0, abs=1e-12),
                       "rho_directions_high": pytest.approx(-1.0, abs=1e-12),
                       "readout_kl_nats": [0.123457, 1.0], "model_kl_nats": [2.5, 0.0]}


def test_fidelity_with_groups_of_one_token_on_six_tokens(model):
    """6 positions in groups of 1 make 6 bootstrap groups: enough (and the layer is reported)."""
    ids = IDS[:1, :6]
    lens = LogitLens(model)
    data = prepare(lens, capture(model, ids, layers=[1])[1], 1, "mean", group_tokens=1)
    frame = torch.eye(32)[:3]
    result = causal_fidelity(model, lens, ids, data, frame, resamples=50)
    assert result.layer == 1 and result.readout_kl.shape == (3,)


def test_fidelity_refuses_two_directions(model):
    lens = LogitLens(model)
    data = prepare(lens, capture(model, IDS, layers=[1])[1], 1, "mean", group_tokens=8)
    with pytest.raises(CausalError, match="k = 2 directions"):
        causal_fidelity(model, lens, IDS, data, torch.eye(32)[:2])


def test_fidelity_interval_follows_seed_and_resamples_and_prints_nothing(model, capsys):
    """The default is 1000 resamples with seed 0; another seed or count gives another interval;
    no progress bar unless asked. (16 directions: ρ takes enough distinct values that one more
    resample moves an interpolated quantile.)"""
    lens = random_tuned_lens(model, seed=1, std=0.2)
    data = prepare(lens, capture(model, IDS, layers=[1])[1], 1, "mean", group_tokens=4)
    frame = torch.linalg.qr(torch.randn(32, 16, generator=torch.Generator().manual_seed(2))).Q.T.contiguous()
    default = causal_fidelity(model, lens, IDS, data, frame)
    assert capsys.readouterr().err == ""
    explicit = causal_fidelity(model, lens, IDS, data, frame, resamples=1000, seed=0)
    assert (default.low, default.high) == (explicit.low, explicit.high)
    other_seed = causal_fidelity(model, lens, IDS, data, frame, resamples=1000, seed=1)
    more = causal_fidelity(model, lens, IDS, data, frame, resamples=1001, seed=0)
    assert (more.low, more.high) != (default.low, default.high)
    fewer = causal_fidelity(model, lens, IDS, data, frame, resamples=20, seed=0)
    assert (other_seed.low, other_seed.high) != (default.low, default.high)
    assert (fewer.low, fewer.high) != (default.low, default.high)


def test_fidelity_of_a_blind_readout_is_undefined(model, blind_to_all):
    """All readout KLs are the same (0 up to the rounding of ``Σ p log p − Σ p z + logsumexp z``,
    identical for identical logits): Spearman's ρ is NaN and so is every bootstrap sample, so the
    interval is (NaN, NaN)."""
    data = prepare(blind_to_all, capture(model, IDS, layers=[1])[1], 1, "mean", group_tokens=8)
    result = causal_fidelity(model, blind_to_all, IDS, data, torch.eye(32)[:3], resamples=50)
    assert torch.all(result.readout_kl == result.readout_kl[0]) and float(result.readout_kl[0]) < 1e-5
    assert math.isnan(result.rho) and math.isnan(result.low) and math.isnan(result.high)


# --- basis ------------------------------------------------------------------------------------


def test_check_directions_boundaries():
    """``1 ≤ k ≤ d``: both ends accepted, one past either refused with the range in the message."""
    check_directions(1, 32)
    check_directions(32, 32)
    with pytest.raises(CausalError, match="k = 0 directions cannot be found in a residual stream of width 32: "
                                          "choose k between 1 and 32"):
        check_directions(0, 32)
    with pytest.raises(CausalError, match="k = 33 directions"):
        check_directions(33, 32)


def test_a_readout_of_an_identical_copy_of_the_model_is_accepted(model):
    """Same weights, other objects: the fingerprints agree, so the readout is the model's."""
    twin = tiny_model("llama", initializer_range=0.3)
    parts = check_readout(model, LogitLens(twin))
    assert parts.unembedding is model_parts(model).unembedding


def _basis(model, layer: int) -> CausalBasis:
    generator = torch.Generator().manual_seed(layer)
    return CausalBasis(
        layer=layer, basis=torch.linalg.qr(torch.randn(32, 3, generator=generator)).Q.T.contiguous(),
        energies=torch.tensor([3.0, 2.0, 0.1234567]), mean=torch.randn(32, generator=generator), mode="resample",
        readout="tuned", method="sequential", fingerprint=fingerprint(model_parts(model)), model_name="tiny-llama",
        seconds=1.5, positions=64, evaluations=12.25, info={"max_iter": 7},
    )


def test_bases_round_trip_every_field_and_write_the_documented_json(model, tmp_path):
    bases = [_basis(model, 1), _basis(model, 3)]
    folder = save_bases(tmp_path / "b", bases)
    text = (Path(folder) / "bases.json").read_text()
    assert text.startswith('{\n  "format": "depthlens-causal-bases",\n  "format_version": 1,\n  "bases": [\n')
    assert text.endswith("}\n")
    assert json.loads(text)["bases"][1] == {
        "layer": 3, "k": 3, "mode": "resample", "readout": "tuned", "method": "sequential",
        "fingerprint": bases[1].fingerprint, "model_name": "tiny-llama", "seconds": 1.5, "positions": 64,
        "evaluations": 12.25, "info": {"max_iter": 7}, "energies_nats": [3.0, 2.0, 0.123457],
    }
    loaded = load_bases(folder, model)
    assert sorted(loaded) == [1, 3]
    for basis in bases:
        got = loaded[basis.layer]
        assert got.layer == basis.layer
        for name in ("basis", "energies", "mean"):
            assert torch.equal(getattr(got, name), getattr(basis, name))
        for name in ("mode", "readout", "method", "fingerprint", "model_name", "seconds", "positions",
                     "evaluations", "info"):
            assert getattr(got, name) == getattr(basis, name), name


def test_bases_json_without_the_optional_keys_loads_with_defaults(model, tmp_path):
    folder = save_bases(tmp_path / "b", [_basis(model, 2)])
    path = Path(folder) / "bases.json"
    config = json.loads(path.read_text())
    for key in ("model_name", "seconds", "positions", "evaluations", "info"):
        del config["bases"][0][key]
    path.write_text(json.dumps(config))
    loaded = load_bases(folder, model)[2]
    assert (loaded.model_name, loaded.seconds, loaded.positions, loaded.evaluations, loaded.info) == ("", 0.0, 0, 0.0, {})


def test_bases_folders_that_are_incomplete_damaged_or_foreign_are_refused(model, tmp_path):
    folder = Path(save_bases(tmp_path / "b", [_basis(model, 2)]))
    (folder / "bases.safetensors").rename(tmp_path / "tensors")
    with pytest.raises(CausalError, match="is not a causal-bases folder \\(bases.json and bases.safetensors\\): "
                                          "pass the --out folder of depthlens causal"):
        load_bases(folder, model)
    (tmp_path / "tensors").rename(folder / "bases.safetensors")
    (folder / "bases.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CausalError, match="is damaged \\(\\w*Error\\): extract the bases again"):
        load_bases(folder, model)
    save_bases(folder, [_basis(model, 2)])
    (folder / "bases.json").write_text(json.dumps({"format": "other", "bases": []}))
    with pytest.raises(CausalError, match="bases.json is not a causal-bases file: extract the bases again"):
        load_bases(folder, model)
    save_bases(folder, [_basis(model, 2)])
    with pytest.raises(CausalError, match="were extracted on 'tiny-llama', not on"):
        load_bases(folder, tiny_model("llama", seed=7))


def test_extract_basis_records_what_it_did(model):
    """Layer, mode, readout kind, method, model, positions, cost and the search options."""
    lens = LogitLens(model)
    states = capture(model, IDS, layers=[2])[2]
    basis = extract_basis(lens, states, 2, 2, mode="resample", method="sequential", seed=3, max_iter=3)
    assert (basis.layer, basis.mode, basis.readout, basis.method) == (2, "resample", lens.kind, "sequential")
    assert basis.fingerprint == fingerprint(lens.parts) and basis.model_name == lens.parts.model_name
    assert basis.positions == 64 and basis.info == {"max_iter": 3}
    assert 0 < basis.seconds < 60 and 2 * 2 <= basis.evaluations
    data = prepare(lens, states, 2, "resample", seed=3)
    torch.testing.assert_close(basis.mean, data.mean)
    again = extract_basis(lens, data, 2, 2, method="sequential", max_iter=3)
    torch.testing.assert_close(again.basis, basis.basis)  # the seed drew the same derangement
    default = extract_basis(lens, states, 2, 2, refine_steps=2, refine_positions=8)
    assert (default.mode, default.method, default.info) == ("mean", "batched", {"refine_steps": 2, "refine_positions": 8})


def test_extract_basis_refuses_unknown_methods_and_data_of_another_layer(model):
    lens = LogitLens(model)
    states = capture(model, IDS, layers=[1])[1]
    with pytest.raises(CausalError, match="unknown extraction method 'greedy': choose batched or sequential"):
        extract_basis(lens, states, 1, 2, method="greedy")
    data = prepare(lens, states, 1)
    with pytest.raises(CausalError, match="the prepared data are of layer 1, not 2: prepare them for layer 2"):
        extract_basis(lens, data, 2, 2)


# --- search -----------------------------------------------------------------------------------


def test_brockett_weights_and_energy_captured():
    """``1, (k−1)/k, …, 1/k``; the first ``k`` energies summed, NaN past the end."""
    torch.testing.assert_close(brockett_weights(4), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    energies = torch.tensor([3.0, 2.0, 1.0])
    assert energy_captured(energies, 2) == 5.0
    assert energy_captured(energies, 3) == 6.0
    assert math.isnan(energy_captured(energies, 4))


def test_orthonormal_rows_is_gram_schmidt_with_positive_diagonal():
    """Rows already orthonormal come back unchanged; a dependent row has a zero diagonal entry,
    whose sign counts as +."""
    frame = torch.linalg.qr(torch.randn(5, 3, generator=torch.Generator().manual_seed(1))).Q.T
    torch.testing.assert_close(orthonormal_rows(frame), frame, atol=10 * EPS, rtol=0)
    torch.testing.assert_close(orthonormal_rows(-2.0 * frame), -frame, atol=10 * EPS, rtol=0)
    params = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    rows = orthonormal_rows(params)
    torch.testing.assert_close(rows[0], torch.tensor([1.0, 0.0, 0.0]))
    assert float(rows[1].norm()) == pytest.approx(1.0, abs=1e-6)


def _linear_case(seed: int = 5, n: int = 6, d: int = 3, vocab: int = 5):
    generator = torch.Generator().manual_seed(seed)
    weight = 2.0 * torch.randn(vocab, d, generator=generator)
    states = torch.randn(n, d, generator=generator)
    readout = LinearReadout(weight)
    return readout, weight, states, prepare(readout, states, 0, "mean")


def test_score_samples_are_gradients_of_sampled_log_probabilities():
    """For logits ``W h``: ``∇_h log p(y|h) = Wᵀ(e_y − p)``. Each sample is one of those vectors
    (its token identified by the nearest one), and tokens are drawn from ``p_n``: with 3000 draws
    the frequencies are within 5 standard deviations (≤ 0.046) of ``p_n``."""
    readout, weight, states, data = _linear_case()
    samples = 3000
    scores = score_samples(readout, data, samples, seed=1, max_rows=4)  # two blocks of rows
    assert scores.shape == (6, samples, 3)
    p = (states @ weight.T).softmax(-1)
    candidates = (torch.eye(5)[None] - p[:, None]) @ weight  # [n, vocab, d]: Wᵀ(e_y − p_n)
    distance = (scores[:, :, None] - candidates[:, None]).norm(dim=-1)  # [n, samples, vocab]
    nearest = distance.min(-1)
    assert float(nearest.values.max()) < 1e-4
    frequency = torch.nn.functional.one_hot(nearest.indices, 5).float().mean(1)
    assert float((frequency - p).abs().max()) < 0.046
    torch.testing.assert_close(score_samples(readout, data, 4, seed=1), score_samples(readout, data, 4, seed=1))
    assert not torch.equal(score_samples(readout, data, 4, seed=1), score_samples(readout, data, 4, seed=2))
    torch.testing.assert_close(score_samples(readout, data, 4), score_samples(readout, data, 4, seed=0))


def test_score_samples_decode_each_position_once_in_blocks_of_max_rows():
    """6 positions with ``max_rows = 2``: three decodes of 2 rows, and every position's samples
    are score vectors ``Wᵀ(e_y − p_n)`` of its own state."""
    generator = torch.Generator().manual_seed(5)
    weight, states = 2.0 * torch.randn(5, 3, generator=generator), torch.randn(6, 3, generator=generator)
    readout = CountingReadout(weight)
    data = prepare(readout, states, 0, "mean")
    readout.rows.clear()
    scores = score_samples(readout, data, 3, max_rows=2)
    assert readout.rows == [2, 2, 2]
    candidates = (torch.eye(5)[None] - (states @ weight.T).softmax(-1)[:, None]) @ weight
    distance = (scores[:, :, None] - candidates[:, None]).norm(dim=-1)
    assert float(distance.min(-1).values.max()) < 1e-4


def test_the_surrogate_energy_by_hand():
    """``½ mean_{n,j} (δ_n·v)² (s_{n,j}·v)²`` for two positions, two samples, ``v = e_1, e_2``."""
    delta = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    scores = torch.tensor([[[1.0, 0.0], [2.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]]])
    # e_1: δ·v = 1, 3; s·v = (1, 2), (0, 1) → ½ · (1·1 + 1·4 + 9·0 + 9·1) / 4 = 14/8
    # e_2: δ·v = 2, −1; s·v = (0, 1), (1, 1) → ½ · (4·0 + 4·1 + 1·1 + 1·1) / 4 = 6/8
    torch.testing.assert_close(_surrogate(delta, scores)(torch.eye(2)), torch.tensor([14 / 8, 6 / 8]))


def _axes_case() -> tuple[SimpleNamespace, torch.Tensor]:
    """δ and scores of position ``n`` both along axis ``n`` (d = 4), with ``α_n² β_n²`` = 4, 36, 1, 9:
    the surrogate is ``Σ_n c_n v_n⁴`` and the Brockett maximiser is the axes in the order 2, 4, 1, 3."""
    alpha = torch.tensor([1.0, 2.0, 1.0, 3.0])
    beta = torch.tensor([2.0, 3.0, 1.0, 1.0])
    delta = torch.diag(alpha)
    scores = torch.diag(beta)[:, None, :]
    return SimpleNamespace(delta=delta), scores


def test_the_surrogate_fit_finds_the_ordered_axes():
    data, scores = _axes_case()
    frame = _fit_surrogate(data, scores, 3, 50)
    torch.testing.assert_close(frame.abs(), torch.eye(4)[[1, 3, 0]], atol=1e-4, rtol=0)


def test_the_surrogate_fit_climbs_from_a_start_that_is_not_the_optimum():
    """Three random positions in d = 2, one score sample each: the fit's start (top eigenvector of
    the symmetrised ``Σ F``) is ~27° off; the fitted direction is the brute-force maximum of the
    surrogate over the circle (0.9 µrad grid)."""
    generator = torch.Generator().manual_seed(2)
    delta, scores = torch.randn(3, 2, generator=generator), torch.randn(3, 1, 2, generator=generator)
    (v,) = _fit_surrogate(SimpleNamespace(delta=delta), scores, 1, 100)
    angles = torch.linspace(0, math.pi, 200_001, dtype=torch.float64)
    circle = torch.stack([angles.cos(), angles.sin()], -1)
    values = 0.5 * ((delta.double() @ circle.T) ** 2 * (scores[:, 0].double() @ circle.T) ** 2).mean(0)
    best = circle[values.argmax()]
    assert abs(float(v.double() @ best)) > 1 - 1e-6
    product = (delta.T @ delta / 3) @ (scores[:, 0].T @ scores[:, 0] / 3)
    start = torch.linalg.eigh((product + product.T) / 2).eigenvectors[:, -1]
    assert abs(float(start.double() @ best)) < 0.95  # L-BFGS had work to do


def test_batched_search_from_the_surrogate_start_alone(model):
    """Without refinement steps the frame is the surrogate's (sorted by exact energy), and the
    cost counts 2 evaluations per score sample plus one per direction."""
    readout, _, _, data = _linear_case(n=64, d=3, vocab=7)
    result = batched_search(readout, data, 2, samples=64, refine_steps=0, seed=0)
    assert result.evaluations == 64 * 2.0 + 2
    torch.testing.assert_close(result.basis @ result.basis.T, torch.eye(2), atol=1e-5, rtol=0)
    assert float(result.energies[0]) >= float(result.energies[1])
    svd_start = batched_search(readout, data, 2, refine_steps=0)
    assert svd_start.evaluations == 2.0
    assert not torch.allclose(result.basis.abs(), svd_start.basis.abs(), atol=1e-3)


def test_batched_search_counts_minibatch_evaluations_on_a_shortlist(model):
    """``refine_steps · k · positions / N · (shortlist / vocab)`` plus ``k`` for the exact ending
    (the shortlist: every position's top 8 tokens, filled up to 40 if fewer)."""
    lens = LogitLens(model)
    data = prepare(lens, capture(model, IDS, layers=[1])[1], 1, "mean")
    size = shortlist(data, 40).tokens.shape[0]
    result = batched_search(lens, data, 3, refine_steps=4, refine_positions=16, shortlist_size=40)
    assert result.evaluations == pytest.approx(4 * 3 * 16 / 64 * size / 320 + 3)
    assert 0 < result.seconds < 60


def test_sequential_search_counts_one_exact_evaluation_per_direction():
    """With a tolerance no change can meet (0), each direction spends its ``max_iter`` evaluations
    (or a few more to finish a line search) plus one exact one; the time is positive."""
    readout, _, _, data = _linear_case(n=32, d=3, vocab=7)
    result = sequential_search(readout, data, 2, max_iter=3, tolerance=0.0)
    assert 2 * (3 + 1) <= result.evaluations <= 2 * (3 + 1 + 25)
    assert 0 < result.seconds < 60


# --- erasure ----------------------------------------------------------------------------------


def test_shortlist_is_the_union_of_top_tokens_filled_at_random(model):
    lens = LogitLens(model)
    data = prepare(lens, capture(model, IDS[:1, :2], layers=[3])[3], 3, "mean")
    top2 = set(data.log_probs.topk(2, -1).indices.reshape(-1).tolist())
    only = shortlist(data, size=1, top=2)
    assert set(only.tokens.tolist()) == top2  # size below the union: nothing added
    top8 = set(data.log_probs.topk(8, -1).indices.reshape(-1).tolist())
    assert set(shortlist(data, size=1).tokens.tolist()) == top8  # 8 top tokens by default
    filled = shortlist(data, size=20, top=2, seed=4)
    assert filled.tokens.shape == (20,) and top2 <= set(filled.tokens.tolist())
    assert torch.equal(filled.tokens, filled.tokens.sort().values)
    assert torch.equal(shortlist(data, size=20, top=2, seed=4).tokens, filled.tokens)
    assert not torch.equal(shortlist(data, size=20, top=2, seed=5).tokens, filled.tokens)
    assert torch.equal(shortlist(data, size=20, top=2).tokens, shortlist(data, size=20, top=2, seed=0).tokens)
    expected = data.log_probs[:, filled.tokens] - data.log_probs[:, filled.tokens].logsumexp(-1, keepdim=True)
    torch.testing.assert_close(filled.log_probs, expected)
    torch.testing.assert_close(filled.neg_entropy, (expected.exp() * expected).sum(-1))
    assert torch.all(filled.neg_entropy < 0)
    everything = shortlist(data, size=4000)
    assert torch.equal(everything.tokens, torch.arange(320))


@pytest.mark.parametrize("kind", ["lens", "linear"])
def test_block_kl_on_a_shortlist_is_the_kl_of_the_renormalised_subsets(model, kind):
    """``KL(p|S ‖ q|S)`` with both distributions renormalised over the shortlist ``S``."""
    if kind == "lens":
        readout = LogitLens(model)
        states = capture(model, IDS[:1], layers=[1])[1]
        layer = 1
    else:
        generator = torch.Generator().manual_seed(2)
        readout = LinearReadout(torch.randn(40, 32, generator=generator))
        states, layer = torch.randn(16, 32, generator=generator), 0
    data = prepare(readout, states, layer, "mean")
    tokens = shortlist(data, size=12, top=2)
    frame = torch.linalg.qr(torch.randn(32, 2, generator=torch.Generator().manual_seed(3))).Q.T.contiguous()
    positions = torch.arange(data.num_positions)
    got = block_kl(readout, data, frame, positions, tokens)
    h = data.states.double()
    for i, v in enumerate(frame.double()):
        erased = h - ((h - h.mean(0)) @ v)[:, None] * v
        if kind == "lens":
            clean, ablated = readout(h.float(), 1).double(), readout(erased.float(), 1).double()
        else:
            clean, ablated = h @ readout.weight.double().T, erased @ readout.weight.double().T
        log_p = clean[:, tokens.tokens].log_softmax(-1)
        log_q = ablated[:, tokens.tokens].log_softmax(-1)
        expected = (log_p.exp() * (log_p - log_q)).sum(-1)
        torch.testing.assert_close(got[i].double(), expected, atol=1e-4, rtol=1e-3)


class CountingReadout(LinearReadout):
    """A :class:`LinearReadout` that counts its decodes with gradients on (the search's energy
    evaluations; the exact final energies and the clean decode run without gradients)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.with_grad = 0
        self.rows: list[int] = []

    def iter_logits(self, states: Sequence[torch.Tensor], layers: Iterable[int]) -> Iterator[tuple[int, torch.Tensor]]:
        self.with_grad += torch.is_grad_enabled()
        for layer in layers:
            self.rows.append(states[layer].shape[:-1].numel())
        yield from super().iter_logits(states, layers)


@pytest.mark.parametrize(("max_iter", "tolerance"), [(30, 0.0), (100, 1e-4)])
def test_sequential_search_counts_every_evaluation_and_one_exact_one_per_direction(max_iter, tolerance):
    """``evaluations`` = the energy evaluations the readout saw (one block each: 32 positions fit
    in ``max_rows``) + one exact evaluation per direction; with tolerance 0 no direction stops
    before ``max_iter`` evaluations."""
    generator = torch.Generator().manual_seed(5)
    readout = CountingReadout(2.0 * torch.randn(7, 3, generator=generator))
    data = prepare(readout, torch.randn(32, 3, generator=generator), 0, "mean")
    assert readout.with_grad == 0
    result = sequential_search(readout, data, 2, max_iter=max_iter, tolerance=tolerance)
    assert result.evaluations == readout.with_grad + 2
    if tolerance == 0.0:  # (each direction converges in fewer: its L-BFGS steps end early, the loop goes on)
        assert readout.with_grad >= 2 * max_iter


def test_sequential_search_defaults_and_progress(capsys):
    """The defaults are ``max_iter = 100`` and ``tolerance = 1e-4``; the bar is shown only when
    asked, named after the layer and counting directions."""
    readout, _, _, data = _linear_case(n=32, d=3, vocab=7)
    default = sequential_search(readout, data, 2)
    assert capsys.readouterr().err == ""
    explicit = sequential_search(readout, data, 2, max_iter=100, tolerance=1e-4, progress=True)
    assert torch.equal(default.basis, explicit.basis) and default.evaluations == explicit.evaluations
    err = capsys.readouterr().err
    assert "sequential CBE, layer 0" in err and "2/2" in err and ("dir/s" in err or "s/dir" in err)


def test_sequential_search_with_a_tuned_lens_reports_exact_energies(model):
    """The start uses the tuned lens's translator at the data's layer; energies are exact."""
    from depthlens.analysis.causal import per_position_energy

    tuned = random_tuned_lens(model, seed=1, std=0.2)
    data = prepare(tuned, capture(model, IDS, layers=[1])[1], 1, "mean")
    result = sequential_search(tuned, data, 2, max_iter=3)
    assert torch.equal(result.energies, per_position_energy(tuned, data, result.basis).mean(-1))


@pytest.mark.parametrize("method", ["batched", "sequential"])
def test_extract_basis_hands_seed_options_and_progress_to_the_search(model, method, capsys):
    """The basis is exactly the search's on the prepared data (same seed and options, default
    seed 0), its energies exact, and a progress bar appears only when asked."""
    from depthlens.analysis.causal import per_position_energy

    lens = LogitLens(model)
    states = capture(model, IDS, layers=[2])[2]
    if method == "batched":
        options = {"refine_steps": 2, "refine_positions": 8, "shortlist_size": 0}
        search, label = batched_search, "batched CBE, layer 2: 100%"  # of 3 phases
    else:
        options = {"max_iter": 3, "tolerance": 0.0}
        search, label = sequential_search, "sequential CBE, layer 2: 100%"  # of 2 directions
    basis = extract_basis(lens, states, 2, 2, mode="resample", method=method, seed=3, **options)
    assert capsys.readouterr().err == ""
    data = prepare(lens, states, 2, "resample", seed=3)
    direct = search(lens, data, 2, seed=3, **options) if method == "batched" else search(lens, data, 2, **options)
    assert torch.equal(basis.basis, direct.basis) and basis.evaluations == direct.evaluations
    assert torch.equal(basis.energies, per_position_energy(lens, data, basis.basis).mean(-1))
    if method == "batched":
        assert basis.evaluations == 2 * 2 * 8 / 64 + 2  # 2 steps × 2 directions × 8 of 64 positions, + 2 exact
        default_seed = extract_basis(lens, states, 2, 2, mode="resample", **options)
        assert torch.equal(default_seed.basis, extract_basis(lens, states, 2, 2, mode="resample", seed=0, **options).basis)
        assert not torch.equal(default_seed.basis, basis.basis)
    extract_basis(lens, states, 2, 2, method=method, progress=True, **options)
    assert label in capsys.readouterr().err


# --- erasure data: defaults, limits and the resample derangement --------------------------------------


def test_erasure_data_groups_modes_and_limits(model):
    """Groups are runs of 32 positions by default and of 1 when asked; 2 positions are enough, an
    unknown mode is refused by name; only resampling has a permutation, and it follows the seed."""
    from depthlens.model.edits import derangement

    lens = LogitLens(model)
    states = capture(model, IDS, layers=[1])[1]  # 4 × 16 = 64 positions
    data = prepare(lens, states, 1)
    assert data.groups.tolist() == [0] * 32 + [1] * 32 and data.permutation is None
    assert prepare(lens, states, 1, group_tokens=1).groups.tolist() == list(range(64))
    assert prepare(lens, states[:1, :2], 1).delta.shape == (2, states.shape[-1])
    with pytest.raises(CausalError, match=r"unknown erasure 'blur': choose one of"):
        prepare(lens, states, 1, "blur")
    resampled = prepare(lens, states, 1, "resample", seed=3)
    expected = derangement(64, torch.Generator().manual_seed(3))
    assert resampled.permutation.tolist() == expected.tolist()
    torch.testing.assert_close(resampled.delta, data.states - data.states[expected])


def test_erasure_data_decodes_every_position_whatever_the_block_size(model):
    """The readout's log-probabilities of all 64 positions, in blocks of 5 rows or in one block,
    are the same rows, each a normalised distribution."""
    lens = LogitLens(model)
    states = capture(model, IDS, layers=[1])[1]
    whole = prepare(lens, states, 1)
    blocked = prepare(lens, states, 1, max_rows=5)
    assert blocked.log_probs.shape == whole.log_probs.shape == (64, model.config.vocab_size)
    torch.testing.assert_close(blocked.log_probs, whole.log_probs)
    torch.testing.assert_close(whole.log_probs.exp().sum(-1), torch.ones(64))


def test_energy_and_its_gradient_in_many_blocks_are_the_whole_computation(model):
    """Energies are the per-position KLs averaged over the positions asked for, whatever the block
    size; the gradient of Σ wᵢ·Eᵢ is the one computed in a single block, and matches central
    differences. Blocks of 7 rows split both directions and positions, so every sum must
    accumulate across blocks."""
    from depthlens.analysis.causal.erasure import energy_and_grad, per_position_energy

    lens = LogitLens(model)
    data = prepare(lens, capture(model, IDS, layers=[1])[1], 1)
    frame = torch.linalg.qr(torch.randn(32, 3, generator=torch.Generator().manual_seed(2))).Q.T.contiguous()
    weights = torch.tensor([1.0, 0.5, 0.25])
    positions = torch.arange(0, 64, 3)
    kl = per_position_energy(lens, data, frame)
    energies, grad = energy_and_grad(lens, data, frame, weights, positions, max_rows=7)
    torch.testing.assert_close(energies, kl[:, positions].mean(-1), rtol=1e-5, atol=1e-7)
    whole, whole_grad = energy_and_grad(lens, data, frame, weights, positions, max_rows=10**6)
    torch.testing.assert_close(energies, whole, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-4, atol=1e-6)
    energies_all, _ = energy_and_grad(lens, data, frame, weights, max_rows=7)
    torch.testing.assert_close(energies_all, kl.mean(-1), rtol=1e-5, atol=1e-7)
    step = 1e-2  # one coordinate of the gradient against central differences
    bumped = frame.clone()
    bumped[0, 0] += step
    lowered = frame.clone()
    lowered[0, 0] -= step
    slope = (weights @ (energy_and_grad(lens, data, bumped, weights, positions)[0]
                        - energy_and_grad(lens, data, lowered, weights, positions)[0])) / (2 * step)
    assert abs(float(slope) - float(grad[0, 0])) <= 0.05 * abs(float(grad[0, 0])) + 1e-4
