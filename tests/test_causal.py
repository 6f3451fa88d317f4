"""Causal basis extraction, causal fidelity and stimulus–response alignment on tiny models."""

import pytest
import scipy.stats
import torch
from tiny_models import random_tuned_lens, tiny_model

from depthlens import LayerError, LogitLens, capture
from depthlens.analysis.causal import (
    aitchison_similarity,
    causal_fidelity,
    extract_basis,
    load_bases,
    model_kl,
    per_position_energy,
    prepare,
    save_bases,
    spearman,
    stimulus_response,
)
from depthlens.analysis.causal.erasure import decode_layer, erased_states
from depthlens.analysis.causal.fidelity import RESOLUTION, _erasure
from depthlens.errors import CausalError
from depthlens.model.edits import erase
from depthlens.model.hooks import ablate, run_with_hooks
from depthlens.stats.divergences import kl

IDS = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
FAST = {"refine_steps": 30, "refine_positions": 32}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tuned(model):
    return random_tuned_lens(model, seed=1, std=0.2)


def _planted(model, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """States with a large variance along the direction the readout is most sensitive to (the
    unembedding's top right singular vector), and that direction."""
    generator = torch.Generator().manual_seed(3)
    d = model.lm_head.weight.shape[1]
    direction = torch.linalg.svd(model.lm_head.weight.detach()).Vh[0]
    states = 0.3 * torch.randn(n, d, generator=generator) + 8.0 * torch.randn(n, 1, generator=generator) * direction
    return states, direction


@pytest.mark.parametrize("method", ["batched", "sequential"])
def test_a_planted_direction_is_found_first_and_bases_are_orthonormal(model, method):
    sharp = tiny_model("llama")
    with torch.no_grad():
        sharp.lm_head.weight *= 20
    lens = LogitLens(sharp)
    states, planted = _planted(sharp)
    options = FAST if method == "batched" else {"max_iter": 15}
    basis = extract_basis(lens, states, 1, 6, method=method, **options)
    assert abs(float(basis.basis[0] @ planted)) > 0.9  # the optimum leans a little off the planted axis
    torch.testing.assert_close(basis.basis @ basis.basis.T, torch.eye(6), atol=1e-5, rtol=0)
    assert basis.energies[0] > 5 * basis.energies[1:].max()
    if method == "batched":  # sorted by energy; the greedy reference keeps the order it found
        assert torch.all(basis.energies[:-1] >= basis.energies[1:] - 1e-6)


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_the_erasure_formula_matches_direct_computation(model, tuned, mode):
    states = capture(model, IDS, layers=[2])[2]
    frame = torch.linalg.qr(torch.randn(32, 3)).Q.T
    for lens in (LogitLens(model), tuned):
        data = prepare(lens, states, 2, mode, seed=5)
        h = states.reshape(-1, 32)
        for i in range(3):
            direct = erase(h[None], frame[i : i + 1], mode, mean=h.mean(0), permutation=data.permutation)[0]
            torch.testing.assert_close(erased_states(data, frame)[i], direct, atol=1e-5, rtol=1e-5)
            log_q = decode_layer(lens, direct, 2).log_softmax(-1)
            expected = kl(lens(h, 2).log_softmax(-1), log_q)
            torch.testing.assert_close(per_position_energy(lens, data, frame, max_rows=7)[i], expected.clamp_min(0),
                                       atol=1e-4, rtol=1e-4)


def test_the_model_side_erasure_is_the_hook_layers_ablation(model):
    lens = LogitLens(model)
    states = capture(model, IDS, layers=[1])[1]
    data = prepare(lens, states, 1, "mean")
    v = torch.nn.functional.normalize(torch.randn(32), dim=0)
    ours = run_with_hooks(model, IDS, edits=[_erasure("resid.1", v, data.mean)]).logits
    theirs = run_with_hooks(model, IDS, edits=[ablate("resid.1", v[None], "mean", mean=data.mean)]).logits
    torch.testing.assert_close(ours, theirs)


@pytest.fixture(scope="module")
def sharp():
    """A model whose predictions are far from uniform: erasing a direction at its last layer moves
    them by 0.1–3 nats, where float32 rounding of a KL is ~1e-6 nats. (On the default tiny model
    the KLs are ~1e-6 nats themselves, and rounding reorders directions whose sums nearly tie.)"""
    return tiny_model("llama", initializer_range=0.3)


@pytest.mark.parametrize("which", ["logit", "tuned"])
def test_fidelity_at_the_last_layer_is_perfect(sharp, which):
    model = sharp
    lens = LogitLens(model) if which == "logit" else random_tuned_lens(model, seed=1, std=0.2)
    layer = lens.num_layers
    data = prepare(lens, capture(model, IDS, layers=[layer])[layer], layer, "mean", group_tokens=8)
    basis = extract_basis(lens, data, layer, 5, **FAST)
    torch.testing.assert_close(per_position_energy(lens, data, basis.basis), model_kl(model, IDS, data, basis.basis),
                               atol=1e-4, rtol=1e-4)
    fidelity = causal_fidelity(model, lens, IDS, data, basis, resamples=200)
    assert fidelity.rho == pytest.approx(1.0)
    assert fidelity.low == pytest.approx(1.0) and fidelity.high == pytest.approx(1.0)


def test_tuned_lens_extraction_and_fidelity_run_in_the_middle(sharp):
    """On the sharp model the mean KLs differ by far more than :data:`RESOLUTION`, so ρ is scipy's
    Spearman of the recomputed KLs whatever the CPU's rounding. (On the default tiny model two of them,
    4.8e-6 and 4.5e-6 nats on an AVX2-only CPU, both round to 5 steps and tie.)"""
    model, tuned = sharp, random_tuned_lens(sharp, seed=1, std=0.2)
    data = prepare(tuned, capture(model, IDS, layers=[1])[1], 1, "resample", group_tokens=8)
    basis = extract_basis(tuned, data, 1, 4, **FAST)
    fidelity = causal_fidelity(model, tuned, IDS, data, basis, resamples=100)
    readout = per_position_energy(tuned, data, basis.basis).mean(-1)
    model_side = model_kl(model, IDS, data, basis.basis).mean(-1)
    torch.testing.assert_close(fidelity.readout_kl, readout)
    torch.testing.assert_close(fidelity.model_kl, model_side)
    for kls in (readout, model_side):
        assert kls.sort().values.diff().min() > 1000 * RESOLUTION
    assert fidelity.rho == pytest.approx(scipy.stats.spearmanr(readout, model_side).statistic, abs=1e-9)



def test_fidelity_reuses_the_extractions_energies_only_on_the_same_data(model, tuned):
    states = capture(model, IDS, layers=[1])[1]
    data = prepare(tuned, states, 1, "resample", group_tokens=8)
    basis = extract_basis(tuned, data, 1, 4, **FAST)
    torch.testing.assert_close(basis.energy_at(data), per_position_energy(tuned, data, basis.basis))
    other = prepare(tuned, states, 1, "resample", group_tokens=8, seed=5)  # same states, another derangement
    assert basis.energy_at(other) is None
    fidelity = causal_fidelity(model, tuned, IDS, other, basis, resamples=100)
    torch.testing.assert_close(fidelity.readout_kl, per_position_energy(tuned, other, basis.basis).mean(-1))
    assert not torch.allclose(fidelity.readout_kl, basis.energies, rtol=1e-3)


def test_aitchison_similarity_of_a_vector_with_itself_is_one():
    x = torch.randn(5, 50).log_softmax(-1)
    torch.testing.assert_close(aitchison_similarity(x, x), torch.ones(5))
    weights = torch.rand(5, 50).softmax(-1)
    torch.testing.assert_close(aitchison_similarity(x, x, weights), torch.ones(5))
    torch.testing.assert_close(aitchison_similarity(x, -x), -torch.ones(5))
    torch.testing.assert_close(aitchison_similarity(x, x + 3.0), torch.ones(5))  # clr ignores a constant shift


def test_alignment_of_the_last_layer_with_the_output_is_one(model, tuned):
    result = stimulus_response(model, {"logit": LogitLens(model), "tuned": tuned}, IDS, [0, 3], directions=2,
                               group_tokens=8)
    assert result.similarity["logit"][1] == pytest.approx(1.0, abs=1e-4)
    assert result.similarity["tuned"][1] == pytest.approx(1.0, abs=1e-4)
    # (layers in the middle are checked against the written-out formula in test_oracle_causal.py)


def test_spearman():
    assert float(spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40]))) == pytest.approx(1)
    assert float(spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1]))) == pytest.approx(-1)


def test_bases_are_saved_and_refused_for_another_model(model, tmp_path):
    lens = LogitLens(model)
    basis = extract_basis(lens, capture(model, IDS, layers=[2])[2], 2, 3, **FAST)
    save_bases(tmp_path / "bases", [basis])
    loaded = load_bases(tmp_path / "bases", model)
    torch.testing.assert_close(loaded[2].basis, basis.basis)
    with pytest.raises(CausalError, match="extract them on this model"):
        load_bases(tmp_path / "bases", tiny_model("llama", seed=7))
    with pytest.raises(CausalError, match="not a causal-bases folder"):
        load_bases(tmp_path, model)


def test_bad_input_is_refused_before_work(model):
    lens = LogitLens(model)
    states = capture(model, IDS, layers=[1])[1]
    with pytest.raises(CausalError, match="width 32"):
        extract_basis(lens, states, 1, 33)
    with pytest.raises(LayerError, match="out of range"):
        extract_basis(lens, states, 9, 3)
    with pytest.raises(CausalError, match="at least 2"):
        prepare(lens, states[:1, :1], 1)
    data = prepare(lens, states, 1, group_tokens=32)
    with pytest.raises(CausalError, match="groups"):
        causal_fidelity(model, lens, IDS, data, torch.eye(32)[:4])
    with pytest.raises(CausalError, match="not for"):
        causal_fidelity(tiny_model("llama", seed=7), lens, IDS, data, torch.eye(32)[:4])


def test_batched_captures_about_what_the_sequential_reference_does(model):
    lens = LogitLens(model)
    data = prepare(lens, capture(model, IDS, layers=[2])[2], 2, "mean")
    batched = extract_basis(lens, data, 2, 4, **FAST)
    sequential = extract_basis(lens, data, 2, 4, method="sequential", max_iter=10)
    assert batched.captured(4) >= 0.9 * sequential.captured(4)


def test_cli_writes_results_pictures_and_bases(tiny_model_dir, tmp_path):
    import argparse
    import json

    from depthlens.apps.cli_causal import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    common = ["--model", str(tiny_model_dir), "--tokens", "256", "--chunk-len", "64", "--layers", "1,3"]
    args = parser.parse_args(["causal", *common, "--k", "3", "--alignment", "--directions", "1",
                              "--alignment-tokens", "64", "--out", str(tmp_path / "c")])
    args.run(args)
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["readouts"]["logit"]["fidelity"][1]["rho"] == pytest.approx(1.0)
    assert {"energy_logit.png", "fidelity_logit.html", "alignment.png", "results.csv"} <= {
        p.name for p in (tmp_path / "c").iterdir()}
    assert results["alignment"]["similarity"]["logit"][1] == pytest.approx(1.0, abs=1e-4)  # layer 3 is the output
    again = parser.parse_args(["causal", *common, "--k", "3", "--bases", str(tmp_path / "c" / "bases" / "logit"),
                               "--out", str(tmp_path / "d")])
    again.run(again)
    reloaded = json.loads((tmp_path / "d" / "results.json").read_text())["readouts"]["logit"]
    assert reloaded["fidelity"] == results["readouts"]["logit"]["fidelity"]  # the saved bases are the ones found
    for basis, fidelity in zip(reloaded["bases"], reloaded["fidelity"], strict=True):
        assert fidelity["readout_kl_nats"] == basis["energies_nats"]  # each direction's energy, on the same tokens
    random_tuned_lens(tiny_model("llama"), seed=3, std=0.2).save_pretrained(tmp_path / "lens")
    args = parser.parse_args(["drift", *common[:-1], "0,1,2,3", "--lens", str(tmp_path / "lens"), "--out", str(tmp_path / "e")])
    args.run(args)
    drift = json.loads((tmp_path / "e" / "results.json").read_text())
    ce, penalty = torch.tensor(drift["ce_nats"]), torch.tensor(drift["transfer_ce_penalty_nats"])
    torch.testing.assert_close(penalty, ce - ce.diagonal()[None, :])  # the state's own translator subtracted
    similarity = torch.tensor(drift["covariance_similarity"])
    mask = ~torch.eye(len(drift["layers"]), dtype=torch.bool)
    expected = scipy.stats.spearmanr(similarity[mask], penalty[mask]).statistic
    assert drift["rho_similarity_vs_ce_penalty"] == pytest.approx(expected, abs=1e-6)
    assert "4 sequences, and the interval needs 8" in drift["rho_interval_note"]
    args = parser.parse_args(["drift", *common[:2], "--tokens", "256", "--chunk-len", "16", "--layers", "0,1,2,3",
                              "--lens", str(tmp_path / "lens"), "--out", str(tmp_path / "g")])
    args.run(args)
    grouped = json.loads((tmp_path / "g" / "results.json").read_text())
    assert grouped["interval"]["groups"] == 16 and "exploratory" in grouped["top2_removed"]
    for key in ("rho_similarity_vs_ce_penalty", "rho_similarity_top2_removed_vs_ce_penalty"):
        low, high = grouped[f"{key}_interval"]
        assert low <= grouped[key] <= high and high > low
    with pytest.raises(CausalError, match="width"):
        bad = parser.parse_args(["causal", *common, "--k", "99", "--out", str(tmp_path / "f")])
        bad.run(bad)


def test_cli_resumes_an_interrupted_run_from_its_finished_layers(tiny_model_dir, tmp_path, monkeypatch):
    """A run stopped during its second layer keeps the first in ``partial/``; ``--resume`` then
    extracts only the second and writes what an uninterrupted run writes, and clears
    ``partial/``. Finished layers of other settings (another seed) are not reused. Planted bugs:
    layers kept whatever the settings, the kept layer's fidelity not the one computed."""
    import argparse
    import json

    from depthlens.analysis import causal
    from depthlens.apps.cli_causal import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    common = ["causal", "--model", str(tiny_model_dir), "--tokens", "256", "--chunk-len", "64", "--layers", "1,3",
              "--k", "3", "--plotlyjs", "cdn"]

    def run(out: str, *extra: str) -> None:
        args = parser.parse_args([*common, *extra, "--out", str(tmp_path / out)])
        args.run(args)

    run("full")
    real_fidelity, real_extract = causal.causal_fidelity, causal.extract_basis

    def stop_at_layer_3(model, readout, ids, data, basis, **kwargs):
        if data.layer == 3:
            raise KeyboardInterrupt
        return real_fidelity(model, readout, ids, data, basis, **kwargs)

    extracted = []

    def counted(readout, data, layer, k, **kwargs):
        extracted.append(layer)
        return real_extract(readout, data, layer, k, **kwargs)

    full = json.loads((tmp_path / "full" / "results.json").read_text())["readouts"]["logit"]
    for seed, expected in (("0", [3]), ("1", [1, 3])):  # the interrupted run's seed; the resumed one's is 0
        out = tmp_path / f"interrupted-{seed}"
        monkeypatch.setattr(causal, "causal_fidelity", stop_at_layer_3)
        with pytest.raises(KeyboardInterrupt):
            run(out.name, "--seed", seed)
        assert (out / "partial" / "logit" / "layer_1" / "fidelity.json").is_file()
        assert not (out / "results.json").exists()
        monkeypatch.setattr(causal, "causal_fidelity", real_fidelity)
        monkeypatch.setattr(causal, "extract_basis", counted)
        extracted.clear()
        run(out.name, "--resume", "--seed", "0")
        monkeypatch.setattr(causal, "extract_basis", real_extract)
        assert extracted == expected
        assert not (out / "partial").exists()
        resumed = json.loads((out / "results.json").read_text())["readouts"]["logit"]
        assert resumed["fidelity"] == full["fidelity"]
        assert [b["energies_nats"] for b in resumed["bases"]] == [b["energies_nats"] for b in full["bases"]]


def test_readout_digest_tells_lenses_apart_by_their_weights(model):
    """Finished layers are kept only for the very same readout: the digest changes with any
    translator weight and the readout's kind, not with a copy of the same weights."""
    from depthlens.analysis.causal.layer_file import readout_digest

    first, same = random_tuned_lens(model, seed=1, std=0.1), random_tuned_lens(model, seed=1, std=0.1)
    assert readout_digest(first) == readout_digest(same)
    with torch.no_grad():
        same.translators[2].bias[0] += 1e-6
    assert readout_digest(first) != readout_digest(same)
    assert readout_digest(LogitLens(model)) != readout_digest(first)
