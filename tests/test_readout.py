"""Any object with the Readout members works with trajectories, evaluation and lens comparison."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from depthlens import LogitLens, Readout, Trajectory, TunedLens, capture, find_parts
from depthlens.analysis.compare import compare_lenses
from depthlens.analysis.evaluate import evaluate
from depthlens.errors import EvaluationError
from depthlens.stats.divergences import cross_entropy, entropy, kl, log_probs


class ScaledReadout:
    """Not a Lens: decodes each state as the model does, then multiplies the logits by
    ``factor`` (a sharper distribution)."""

    kind = "scaled"

    def __init__(self, model, factor=2.0):
        self.parts = find_parts(model)
        self.factor = factor

    @property
    def num_layers(self):
        return self.parts.num_layers

    def iter_logits(self, states, layers=None):
        for layer in range(len(states)) if layers is None else layers:
            yield layer, self.factor * self.parts.decode(states[layer])


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", initializer_range=0.3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def states(model, ids):
    return capture(model, ids)


def _direct(model, states, layer):
    """Log-probabilities ``[batch, seq, vocab]`` of the scaled readout at ``layer``, float32."""
    return log_probs(2.0 * find_parts(model).decode(states[layer]))


def test_the_protocol_is_structural(model):
    assert isinstance(ScaledReadout(model), Readout)
    assert isinstance(LogitLens(model), Readout) and isinstance(TunedLens(model), Readout)
    assert not isinstance(object(), Readout)


def test_trajectory_of_a_custom_readout(model, ids, states):
    readout = ScaledReadout(model)
    traj = Trajectory.from_ids(model, readout, ids, k=3)
    assert traj.lens_kind == "scaled" and traj.lens_name == "scaled lens" and traj.layers == (0, 1, 2, 3)
    assert torch.equal(traj.top_ids[-1, ..., 0], states.logits.argmax(-1))
    assert (traj.kl_to_final[-1].abs() < 1e-5).all()
    final = log_probs(states.logits)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -1)], 1)
    for row in range(3):
        log_q = _direct(model, states, row)
        assert torch.allclose(traj.entropy[row], entropy(log_q), atol=1e-4)
        assert torch.allclose(traj.kl_to_final[row], kl(final, log_q), atol=1e-4)
        assert torch.allclose(traj.ce[row], cross_entropy(log_q, targets), atol=1e-4, equal_nan=True)
        assert torch.equal(traj.top_ids[row], log_q.topk(3, dim=-1).indices)


def test_evaluation_of_a_custom_readout(model):
    chunks = [torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    readouts = {"scaled": ScaledReadout(model), "logit": LogitLens(model)}
    report = evaluate(model, readouts, chunks, [20] * 4, batch_size=3, groups=2, resamples=50, progress=False)
    states = capture(model, torch.stack(chunks))
    final = log_probs(states.logits[:, :-1])
    for layer, (kl_mean, ce_mean) in enumerate(zip(report.mean("scaled", "kl"), report.mean("scaled", "ce"))):
        log_q = _direct(model, states, layer)[:, :-1]
        assert kl_mean == pytest.approx(kl(final, log_q).mean().item(), abs=1e-5)
        assert ce_mean == pytest.approx(cross_entropy(log_q, torch.stack(chunks)[:, 1:]).mean().item(), abs=1e-5)
    assert report.mean("scaled", "kl")[-1] > 1e-3 and report.mean("logit", "kl")[-1] == pytest.approx(0, abs=1e-6)
    with pytest.raises(EvaluationError, match="another model object"):
        evaluate(model, {"other": ScaledReadout(tiny_model("llama"))}, chunks, [20] * 4, progress=False)


def test_comparing_a_custom_readout_with_the_logit_lens(model, states):
    divergence = compare_lenses(LogitLens(model), ScaledReadout(model), states, layers=[1], chunk_tokens=4)
    assert divergence.layers == (1, 3)
    for row, layer in enumerate(divergence.layers):
        log_p, log_q = log_probs(find_parts(model).decode(states[layer])), _direct(model, states, layer)
        assert torch.allclose(divergence.kl[row], kl(log_p, log_q), atol=1e-5)
        p, q = log_p.double().exp(), log_q.double().exp()
        m = (p + q) / 2
        js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
        assert torch.allclose(divergence.js[row].double(), js, atol=1e-5)
        assert torch.allclose(divergence.tv[row].double(), 0.5 * (p - q).abs().sum(-1), atol=1e-5)
    assert (divergence.kl > 1e-3).all() and (divergence.js > 1e-4).all() and (divergence.tv > 1e-3).all()
