"""Oracle tests of the application pipelines: an AUROC on a constructed separation, a spy that
fails if a held-out example reaches a detector's ``fit``, permuted demonstrations read back
from the prompts, and prediction depth against settling layers written out by hand."""

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
from tiny_models import tiny_model

from depthlens import LogitLens, capture
from depthlens.analysis.applications.depth import depth_vs_training, settling_index
from depthlens.analysis.applications.features import ChoiceScores
from depthlens.analysis.applications.injection import evaluate_detectors
from depthlens.analysis.applications.overthinking import overthinking
from depthlens.analysis.applications.tasks import DEMO_SEPARATOR, Example, make_task

injection = importlib.import_module("depthlens.analysis.applications.injection")
overthinking_module = importlib.import_module("depthlens.analysis.applications.overthinking")
N_CLEAN, N_INJECTED, LAYERS, CHOICES = 24, 12, 2, 2


def _scores(offset: float, n: int, seed: int) -> ChoiceScores:
    """Features on the line ``z·(1, 1, 1, 1)`` plus small noise, moved by ``offset`` across it
    (``(1, −1, 1, −1)``): clean examples at 0, injected ones far off the line."""
    rng = np.random.default_rng(seed)
    line = rng.normal(size=(n, 1)) * np.ones(LAYERS * CHOICES)
    noise = 0.05 * rng.normal(size=(n, LAYERS * CHOICES))
    across = offset * np.array([1.0, -1.0, 1.0, -1.0])
    features = line + noise + across + 1e-3 * np.arange(n)[:, None]  # every row distinct
    loglik = features.reshape(n, LAYERS, CHOICES)
    hidden = np.concatenate([features, features], 1).reshape(n, 1, 8).repeat(LAYERS, 1).astype(np.float32)
    return ChoiceScores({"logit": loglik}, np.zeros(n, np.int64), hidden, [f"e{i}" for i in range(n)], hidden + 100)


def test_a_constructed_separation_has_auroc_one_for_every_detector():
    clean, injected = _scores(0.0, N_CLEAN, 0), _scores(10.0, N_INJECTED, 1)
    result = evaluate_detectors(clean, injected, seeds=3, resamples=100, detectors=("isolation-forest", "lof"))
    assert [m.detector for m in result.methods] == ["isolation-forest", "lof", "srm", "srm"]
    for method in result.methods:  # injected rows are 10 noise-widths off the line: perfectly separated
        assert method.per_seed == [1.0, 1.0, 1.0], method.method
        assert method.auroc == method.low == method.high == 1.0


def test_no_held_out_example_ever_reaches_fit(monkeypatch):
    clean, injected = _scores(0.0, N_CLEAN, 2), _scores(10.0, N_INJECTED, 3)
    calls = []
    real = injection.fit_score

    def spy(name, normal, test, seed=0, **options):
        calls.append((normal.copy(), test.copy()))
        return real(name, normal, test, seed, **options)

    monkeypatch.setattr(injection, "fit_score", spy)
    evaluate_detectors(clean, injected, seeds=4, resamples=10, detectors=("lof",))
    assert len(calls) == 3 * 4  # (lof, our srm, the authors' srm) × seeds
    middle = injection.AUTHORS.layer_of(clean.num_layers)
    clean_rows, injected_rows = ({tuple(r) for r in [*s.features("logit"), *s.hidden[:, -1], *s.prompt_mean[:, middle]]}
                                 for s in (clean, injected))
    for normal, test in calls:
        fitted, tested = {tuple(r) for r in normal}, {tuple(r) for r in test}
        assert fitted <= clean_rows and not fitted & tested  # fit on clean training rows only
        assert len(fitted) == round(0.75 * N_CLEAN) and len(test) == N_CLEAN - len(fitted) + N_INJECTED
        assert len(injected_rows & tested) == N_INJECTED  # every injected example is scored


def test_overthinking_scores_demonstrations_with_permuted_labels(monkeypatch):
    choices = (" fog", " rain", " fair")
    examples = [Example(f"question {i}?\nAnswer:", choices, i % 3, f"q{i}") for i in range(14)]
    task = make_task("toy", examples)
    seen = []

    def fake_scores(model, tokenizer, readouts, prompts, **_):
        seen.append(list(prompts))
        n = len(prompts)
        return ChoiceScores({"logit": np.zeros((n, 2, 3))}, np.array([e.gold for e in prompts]),
                            np.zeros((n, 2, 4), np.float32), [e.id for e in prompts])

    monkeypatch.setattr(overthinking_module, "score_choices", fake_scores)
    overthinking(None, None, {}, task, shots=3, shift=1, limit=6, progress=False)
    right, wrong = seen
    by_prompt = {e.prompt: e for e in examples}
    for good, bad in zip(right, wrong, strict=True):
        good_demos, bad_demos = good.prompt.split(DEMO_SEPARATOR), bad.prompt.split(DEMO_SEPARATOR)
        assert good_demos[-1] == bad_demos[-1] == by_prompt[good_demos[-1]].prompt
        assert len(good_demos) == len(bad_demos) == 4
        for g, b in zip(good_demos[:-1], bad_demos[:-1], strict=True):
            demo = by_prompt[g[: g.index("Answer:") + len("Answer:")]]
            assert g == demo.prompt + choices[demo.gold]
            assert b == demo.prompt + choices[(demo.gold + 1) % 3] and b != g  # the label is permuted


def _brute_settling(predictions: list[int]) -> int:
    """The first step from which every later prediction equals the last one, by a loop."""
    for step in range(len(predictions)):
        if all(p == predictions[-1] for p in predictions[step:]):
            return step
    raise AssertionError("unreachable")


def test_settling_index_against_a_loop():
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randint(0, 3, (6, 50), generator=generator)
    expected = [_brute_settling(predictions[:, i].tolist()) for i in range(50)]
    assert settling_index(predictions).tolist() == expected
    assert settling_index(torch.tensor([[4], [4], [4]])).tolist() == [0]
    assert settling_index(torch.tensor([[1], [2], [3]])).tolist() == [2]


class _Checkpoint(torch.nn.Module):
    """A stand-in checkpoint whose top-1 next token at every position is given (with the
    attributes by which depthlens recognises a Hugging Face causal LM)."""

    config = None

    def get_input_embeddings(self):
        return None

    def get_output_embeddings(self):
        return None

    def __init__(self, top1: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.top1, self.vocab = top1, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.nn.functional.one_hot(self.top1, self.vocab).float())


def test_depth_against_training_uses_hand_computed_settling_layers():
    model = tiny_model("llama", initializer_range=0.3).eval()
    lens = LogitLens(model)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids, dtype=torch.bool)
    final = torch.randint(0, 320, ids.shape, generator=torch.Generator().manual_seed(5))
    learned = torch.arange(ids.numel()).reshape(ids.shape) % 4  # the checkpoint each token settles at
    checkpoints = [_Checkpoint(torch.where(learned <= c, final, (final + 1 + c) % 320), 320) for c in range(4)]
    with torch.no_grad():
        states = capture(model, ids)
        tops = [lens(states[layer], layer).argmax(-1) for layer in range(lens.num_layers + 1)]
    depth = torch.tensor([[_brute_settling([int(t[b, s]) for t in tops]) for s in range(ids.shape[1])]
                          for b in range(ids.shape[0])])
    assert 0 < depth.float().mean() < lens.num_layers  # an off-by-one would show
    found = depth_vs_training(checkpoints, model, {"logit": lens}, ids, mask, progress=False)
    assert found.mean_iteration == pytest.approx(learned.float().mean().item())
    assert found.mean_depth["logit"] == pytest.approx(depth.float().mean().item())
    expected = scipy.stats.spearmanr(depth.reshape(-1), learned.reshape(-1)).statistic
    assert found.rho["logit"] == pytest.approx(expected, abs=1e-12)
    assert (found.tokens, found.checkpoints) == (ids.numel(), 4)
