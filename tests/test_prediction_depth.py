"""Prediction depth against iteration learned, per example over answer choices
(``depthlens.analysis.applications.depth`` and ``benchmarks/prediction_depth.py``), against answers
worked out by hand, loops, scipy and the text itself."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from depthlens.analysis.applications.depth import (
    draw_distractors,
    example_correlation,
    example_depths,
    frequency_ranked,
    iteration_learned,
    next_word_examples,
    spearman,
    spearman_interval,
    word_counts,
)
from depthlens.errors import ScoreError
from depthlens.stats.bootstrap import interval, resample_counts

ROOT = Path(__file__).resolve().parent.parent


def _scores(answers: list[list[int]], choices: int = 3) -> np.ndarray:
    """Log-likelihoods ``[examples, steps, choices]`` whose likeliest choice at each step is the
    one given (−1 nats for it, −2 for the others)."""
    out = np.full((len(answers), len(answers[0]), choices), -2.0)
    for e, row in enumerate(answers):
        for step, choice in enumerate(row):
            out[e, step, choice] = -1.0
    return out


def _settled(answers: list[int]) -> int:
    """The first step from which every later answer is the last one, by a loop."""
    return next(step for step in range(len(answers)) if all(a == answers[-1] for a in answers[step:]))


# --- prediction depth and iteration learned ------------------------------------------------


def test_prediction_depth_on_hand_built_choice_scores():
    loglik = _scores([
        [2, 2, 2, 2, 2],  # never changes: depth 0
        [0, 1, 1, 1, 1],  # settles at layer 1
        [1, 1, 1, 0, 1],  # agrees at layers 0-2, flips away at 3 and back at L = 4: depth 4
        [0, 2, 1, 0, 0],  # settles at layer 3
    ])
    assert example_depths(loglik).tolist() == [0, 1, 4, 3]


def test_prediction_depth_breaks_ties_to_the_lowest_choice_at_every_layer():
    loglik = np.array([
        # layer 1 ties choices 0 and 1, which counts as choice 0, not the final answer 1: depth 2
        [[-2.0, -1.0, -3.0], [-1.0, -1.0, -3.0], [-3.0, -1.0, -2.0], [-3.0, -1.0, -2.0]],
        # the same tie where the final answer is 0 agrees with it: depth 0
        [[-1.0, -1.0, -3.0], [-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]],
        # a tie at the last layer L makes its answer choice 1 (of 1 and 2); layer 2 says 2: depth 3
        [[-3.0, -1.0, -2.0], [-3.0, -1.0, -2.0], [-3.0, -2.0, -1.0], [-3.0, -1.0, -1.0]],
    ])
    assert example_depths(loglik).tolist() == [2, 0, 3]


def test_prediction_depth_against_a_loop_on_random_scores():
    rng = np.random.default_rng(0)
    loglik = rng.integers(-3, 0, (200, 7, 4)).astype(float)  # many ties
    expected = [_settled([int(np.argmax(layer)) for layer in example]) for example in loglik]
    assert example_depths(loglik).tolist() == expected


def test_iteration_learned_on_a_hand_built_checkpoint_series():
    answers = [  # one row per example, one answer per checkpoint
        [0, 1, 1, 1, 1],  # learned at checkpoint 1
        [2, 2, 2, 2, 2],  # from the start: 0
        [1, 0, 1, 0, 1],  # only the last checkpoint: 4
        [0, 0, 1, 1, 0],  # learned, forgotten, the first answer back at the end: 4
        [3, 3, 1, 3, 3],  # 3
    ]
    loglik = _scores(answers, choices=4).transpose(1, 0, 2)  # [checkpoints, examples, choices]
    assert iteration_learned(loglik).tolist() == [1, 0, 4, 4, 3]
    with pytest.raises(ScoreError, match="checkpoints ≥ 2"):
        iteration_learned(loglik[:1])


# --- Spearman's ρ, its interval, and the per-example correlation ---------------------------


def test_spearman_interval_is_the_quantiles_of_scipy_on_the_shared_resamples():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, 40).astype(float)  # depths: many ties
    y = x + rng.integers(0, 8, 40)
    counts = resample_counts(40, 200, 7).numpy().astype(int)
    brute = [scipy.stats.spearmanr(np.repeat(x, c), np.repeat(y, c)).statistic for c in counts]
    expected = interval(torch.tensor(brute, dtype=torch.float64), 0.9)
    assert spearman_interval(x, y, resamples=200, seed=7, level=0.9) == pytest.approx(expected, abs=1e-12)
    low, high = spearman_interval(x, y, resamples=200, seed=7)
    assert low < scipy.stats.spearmanr(x, y).statistic < high


def test_spearman_interval_leaves_out_constant_resamples():
    x, y = np.array([0.0, 0.0, 0.0, 1.0]), np.array([1.0, 2.0, 3.0, 4.0])
    counts = resample_counts(4, 300, 0).numpy().astype(int)
    defined = [scipy.stats.spearmanr(np.repeat(x, c), np.repeat(y, c)).statistic for c in counts if 0 < c[3] < 4]  # x varies
    assert 0 < len(defined) < 300
    assert spearman_interval(x, y, resamples=300, seed=0) == pytest.approx(interval(torch.tensor(defined, dtype=torch.float64)), abs=1e-12)
    assert all(np.isnan(spearman_interval([1, 1, 1], [1, 2, 3], resamples=20)))


def test_example_correlation_against_scipy_on_hand_built_depths():
    rng = np.random.default_rng(2)
    layers, checkpoints, examples, choices = 5, 6, 60, 4
    depth = rng.integers(0, layers, examples)  # the layer each example settles at, by construction
    learned = np.clip(depth + rng.integers(-1, 2, examples), 0, checkpoints - 1)
    final = rng.integers(0, choices, examples)
    readout = _scores([[a if layer >= d else (a + 1) % choices for layer in range(layers)] for a, d in zip(final, depth)],
                      choices)
    model = _scores([[a if c >= t else (a + 2) % choices for c in range(checkpoints)] for a, t in zip(final, learned)],
                    choices).transpose(1, 0, 2)
    found = example_correlation({"lens": readout}, model, resamples=100, seed=3)
    assert found.rho["lens"] == pytest.approx(scipy.stats.spearmanr(depth, learned).statistic, abs=1e-12)
    assert found.interval["lens"] == spearman_interval(depth, learned, resamples=100, seed=3)
    assert found.mean_depth["lens"] == pytest.approx(depth.mean())
    assert found.mean_iteration == pytest.approx(learned.mean())
    assert (found.examples, found.checkpoints, found.agreement["lens"]) == (examples, checkpoints, 1.0)
    assert found.depth_counts["lens"] == [int((depth == d).sum()) for d in range(layers)]
    assert found.iteration_counts == [int((learned == c).sum()) for c in range(checkpoints)]
    readout[:, -1] = readout[:, -1, ::-1]  # a readout of another model: the final answers differ
    assert example_correlation({"lens": readout}, model, resamples=10).agreement["lens"] < 1.0
    with pytest.raises(ScoreError, match="scored 59 examples"):
        example_correlation({"lens": readout[1:]}, model, resamples=10)


def test_spearman_matches_scipy_on_tied_depths():
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 7, 300), rng.integers(0, 16, 300)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)


# --- the next-word task ----------------------------------------------------------------------


def test_word_counts_keep_whole_lowercase_words():
    counts = word_counts(["The king's men and the king. 'Tis the KING o'er the sea", "the sea, the sea"])
    assert counts == {"the": 5, "king": 1, "men": 1, "and": 1, "sea": 3}
    assert frequency_ranked(counts) == ["the", "sea", "and", "king", "men"]
    assert frequency_ranked(counts, min_count=2) == ["the", "sea"]


RANKED = [f"w{i:03d}" for i in range(100)]


@pytest.mark.parametrize("position", [0, 1, 10, 50, 89, 98, 99])
def test_distractors_are_distinct_near_in_rank_and_never_the_true_word(position):
    for seed in range(50):
        drawn = draw_distractors(RANKED, position, 3, 10, random.Random(seed))
        ranks = [RANKED.index(w) for w in drawn]
        assert len(set(drawn)) == 3 and RANKED[position] not in drawn
        low = min(max(0, position - 10), 100 - 21)  # the 21 ranks of the window, slid inward at the ends
        assert all(low <= r <= low + 20 for r in ranks)


def test_distractors_are_drawn_by_the_seed_and_cover_the_window():
    draws = [draw_distractors(RANKED, 50, 3, 10, random.Random(seed)) for seed in range(200)]
    assert draws == [draw_distractors(RANKED, 50, 3, 10, random.Random(seed)) for seed in range(200)]
    assert len({tuple(d) for d in draws}) > 150
    assert {w for d in draws for w in d} == set(RANKED[40:61]) - {RANKED[50]}
    for position, window in ((0, RANKED[:21]), (99, RANKED[79:])):  # at the ends the window slides inward
        drawn = {w for seed in range(200) for w in draw_distractors(RANKED, position, 3, 10, random.Random(seed))}
        assert drawn == set(window) - {RANKED[position]}
    with pytest.raises(ScoreError, match="need k"):
        draw_distractors(RANKED[:5], 2, 3, 10, random.Random(0))


TEXTS = [
    ("Now is the winter of our discontent made glorious summer by this sun of york; and all the clouds that lour'd "
     "upon our house in the deep bosom of the ocean buried."),
    ("Friends, romans, countrymen, lend me your ears; i come to bury caesar, not to praise him. The evil that men "
     "do lives after them; the good is oft interred with their bones."),
]


def test_next_word_examples_ask_for_the_word_that_follows_the_prompt():
    ranked = frequency_ranked(word_counts(TEXTS * 3))
    examples = next_word_examples(TEXTS, ranked, count=20, seed=5, context_chars=40, window=4)
    assert examples == next_word_examples(TEXTS, ranked, count=20, seed=5, context_chars=40, window=4)
    assert examples != next_word_examples(TEXTS, ranked, count=20, seed=6, context_chars=40, window=4)
    for example in examples:
        text, start = TEXTS[int(example.id.split(":")[0])], int(example.id.split(":")[1])
        answer = example.choices[example.gold]
        assert text[start: start + len(answer)] == answer and not text[start + len(answer)].isalpha()
        assert text[:start].endswith(example.prompt) and 40 - 12 <= len(example.prompt) < 40  # cut at a word start
        assert example.prompt[0] != " " and text[start - len(example.prompt) - 1].isspace()
        assert len(set(example.choices)) == 4 and all(c[0] == " " and c[1:].isalpha() for c in example.choices)
        assert all(c[1:] in ranked for c in example.choices)
    assert len({e.gold for e in examples}) > 1  # the true word's place is shuffled
    with pytest.raises(ScoreError, match="usable next words"):
        next_word_examples(TEXTS, ranked, count=500, seed=5, context_chars=40)


# --- the benchmark -------------------------------------------------------------------------


def _benchmark():
    spec = importlib.util.spec_from_file_location("prediction_depth", ROOT / "benchmarks" / "prediction_depth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoints_are_spaced_by_the_power_1_5():
    bench = _benchmark()
    assert bench.checkpoint_steps(1000, 4) == [125, 354, 650, 1000]  # 1000 · (k/4)^1.5 by hand
    with pytest.raises(SystemExit, match="too few"):
        bench.checkpoint_steps(10, 8)


def test_model_training_is_the_same_for_the_same_seed():
    bench = _benchmark()
    args = bench.parse_args(["--steps", "4", "--checkpoints", "2", "--layers", "1", "--width", "32", "--seq", "16",
                             "--batch", "2"])
    ids = torch.arange(400) % 50

    def trained(seed: int) -> tuple[torch.Tensor, list]:
        model, seen = bench.new_model(args, 50, seed), []
        bench.train_model(args, model, ids, seed, lambda step, loss: seen.append((step, loss)))
        return torch.cat([p.detach().flatten() for p in model.parameters()]), seen

    (first, seen), (again, _), (other, _) = trained(0), trained(0), trained(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert [step for step, _ in seen] == [1, 4]
    start = bench.new_model(args, 50, 0)
    after = []
    for seed in (0, 1):  # the same start and dropout draws, the windows drawn by the seed
        model = copy.deepcopy(start)
        torch.manual_seed(0)
        bench.train_model(args, model, ids, seed, lambda step, loss: None)
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(after[0], after[1])


def test_the_benchmark_runs_every_phase_on_a_tiny_configuration(tmp_path):
    out = tmp_path / "depth.json"
    _benchmark().main(["--seeds", "0", "1", "--steps", "6", "--checkpoints", "3", "--layers", "2", "--width", "32",
                       "--batch", "2", "--vocab", "512", "--examples", "40", "--lens-tokens", "512",
                       "--lens-init-tokens", "256", "--lens-batch-tokens", "256", "--eval-tokens", "1024",
                       "--resamples", "50", "--out", str(out), "--figures", str(tmp_path), "--work", str(tmp_path / "w")])
    report = json.loads(out.read_text())
    assert report["budgets"]["checkpoint_steps"] == [1, 3, 6]
    assert [run["seed"] for run in report["runs"]] == [0, 1]
    for run in report["runs"]:
        assert [c["step"] for c in run["checkpoint_log"]] == [1, 3, 6] and run["checkpoints"] == 3
        assert run["examples"] == 40 and run["agreement"] == {"logit": 1.0, "tuned": 1.0}
        assert run["lens_training"]["kl_tokens"] == 512 and run["lens_training"]["steps"] == 2
        assert run["lens_kl"]["tuned"]["mean_kl_nats"] < run["lens_kl"]["logit"]["mean_kl_nats"]
        assert set(run["seconds"]) == {"model training", "checkpoint scoring", "lens training", "lens KL", "depth scoring"}
    over = report["over_seeds"]
    assert over["mean_kl_nats"]["tuned"] == pytest.approx(np.mean([r["lens_kl"]["tuned"]["mean_kl_nats"] for r in report["runs"]]))
    assert (report["comparison"]["paper"]["tuned_positive"], report["comparison"]["paper"]["logit_positive"],
            report["comparison"]["paper"]["tuned_above_logit"]) == (11, 9, 8)  # counted by hand: prediction-depth ρ of Table 2
    assert (tmp_path / "depth_shakespeare_logit.png").stat().st_size > 0
    assert (tmp_path / "depth_shakespeare_tuned.png").stat().st_size > 0
