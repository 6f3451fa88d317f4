"""Applications of prediction trajectories on tiny random models: cached choice scoring against
brute force, the injection, overthinking, anomaly and depth pipelines, and the commands."""

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from depthlens import LogitLens, TunedLens
from depthlens.analysis.applications.anomaly import rank_texts, score_texts, text_features
from depthlens.analysis.applications.depth import depth_grid, depth_vs_training, token_depths
from depthlens.analysis.applications.features import encode_pair, score_choices
from depthlens.analysis.applications.injection import detect_injections
from depthlens.analysis.applications.load import load_task
from depthlens.analysis.applications.overthinking import overthinking
from depthlens.analysis.applications.tasks import Example, make_task
from depthlens.analysis.trajectory import Trajectory
from depthlens.apps.cli import main
from depthlens.model.hidden_states import capture
from depthlens.model.load import load_model

LINES = [
    "Fair is foul, and foul is fair", "When shall we three meet again", "To be, or not to be",
    "The quick brown fox jumps over the lazy dog", "hover through the fog and filthy air",
    "in thunder, lightning, or in rain", "that is the question", "0123456789 the lazy fox",
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model("llama").eval()


@pytest.fixture(scope="module")
def lenses(model):
    tuned = TunedLens(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for translator in tuned.translators:
            translator.weight.copy_(0.1 * torch.randn(translator.weight.shape, generator=generator))
    return {"logit": LogitLens(model), "tuned": tuned}


def _task(n=16, choices=(" fog", " rain", " fair")):
    examples = [Example(f"{LINES[i % len(LINES)]}?\nAnswer:", choices, i % len(choices), f"t{i}") for i in range(n)]
    return make_task("toy", examples)


def test_cached_choice_scores_equal_a_full_forward_pass_per_choice(model, lenses, tiny_tokenizer):
    examples = _task(5, (" fog and filthy", " rain", " to be, that")).examples
    scores = score_choices(model, tiny_tokenizer, lenses, examples, batch_size=2, progress=False)
    assert scores.loglik["tuned"].shape == (5, 4, 3) and scores.hidden.shape == (5, 4, 32)
    for name, lens in lenses.items():
        for i, example in enumerate(examples):
            for c, choice in enumerate(example.choices):
                context, continuation = encode_pair(tiny_tokenizer, example.prompt, choice)
                states = capture(model, torch.tensor([context + continuation]))
                for layer, logits in lens.iter_logits(states):
                    expected = logits.float().log_softmax(-1)[0, len(context) - 1: -1]
                    expected = expected.gather(-1, torch.tensor(continuation)[:, None]).sum()
                    assert scores.loglik[name][i, layer, c] == pytest.approx(expected.item(), abs=1e-4)
    assert np.allclose(scores.loglik["logit"][:, -1], scores.loglik["tuned"][:, -1])


def test_injection_pipeline_reports_every_method_with_intervals(model, lenses, tiny_tokenizer):
    result, clean, injected = detect_injections(model, tiny_tokenizer, lenses, _task(16), seeds=2, resamples=50,
                                                progress=False)
    assert [m.method for m in result.methods] == [
        "logit lens · isolation-forest", "logit lens · lof", "tuned lens · isolation-forest", "tuned lens · lof",
        "SRM baseline (hidden state 3)", "SRM authors' setup (hidden state 1)"]
    for method in result.methods:
        assert method.low <= method.auroc <= method.high and len(method.per_seed) == 2
    assert (result.n_clean, result.n_injected) == (16, 16)
    # The SRM baseline, evaluated by hand: the same seeded 75 % splits, fit on clean training rows
    # only, scikit-learn's AUROC of held-out clean (0) against injected (1).
    from sklearn.metrics import roc_auc_score

    from depthlens.analysis.applications.anomaly import SRM

    expected = []
    for seed in range(2):
        train = np.sort(np.random.default_rng(seed).permutation(16)[:12])
        held = np.setdiff1d(np.arange(16), train)
        detector = SRM().fit(clean.hidden[train, -1])
        scores = detector.score(np.concatenate([clean.hidden[held, -1], injected.hidden[:, -1]]))
        expected.append(roc_auc_score(np.r_[np.zeros(len(held)), np.ones(16)], scores))
    assert result.methods[-2].per_seed == pytest.approx(expected, abs=1e-12)
    json.dumps(result.to_dict())


def test_overthinking_pipeline_gives_curves_for_every_layer(model, lenses, tiny_tokenizer):
    result, right, wrong = overthinking(model, tiny_tokenizer, lenses, _task(12, (" fog", " rain")), shots=2,
                                        limit=8, batch_size=3, progress=False)
    assert result.examples == 8 and set(result.curves) == {"logit", "tuned"}
    curves = result.curves["tuned"]

    def by_hand(scores):  # per layer: gold probability above its label's median (n = 2), ties sharing
        probs = np.exp(scores.loglik["tuned"]) / np.exp(scores.loglik["tuned"]).sum(-1, keepdims=True)
        out = []
        for layer in range(4):
            credit = []
            for i, g in enumerate(scores.gold):
                column = probs[:, layer, g]
                median = np.quantile(column, 0.5)
                above, tied = (column > median).sum(), (column == median).sum()
                share = min(max(len(column) / 2 - above, 0) / max(tied, 1), 1)
                credit.append(1.0 if column[i] > median else share if column[i] == median else 0.0)
            out.append(np.mean(credit))
        return out

    assert curves.correct == pytest.approx(by_hand(right)) and curves.permuted == pytest.approx(by_hand(wrong))
    assert curves.gap == pytest.approx(np.subtract(curves.correct, curves.permuted).tolist())
    assert len(result.rows()) == 8


def test_text_anomaly_scores_rank_a_planted_anomaly_first(model, lenses, tiny_tokenizer):
    features = text_features(model, tiny_tokenizer, lenses["logit"], LINES[:3], progress=False)
    assert features.shape == (3, 3 * 4)
    # At layer L the logit lens is the model: KL 0 and the model's top-1 at rank 0, for every text.
    np.testing.assert_allclose(features[:, 3 * 3 + 1: 3 * 3 + 3], 0.0, atol=1e-5)
    assert (features[:, 1: 3 * 3: 3] > 1e-4).any()  # earlier layers do differ from the output
    reference = LINES * 3
    texts = [LINES[0], "zzzz qqqq xxxx zzzz qqqq xxxx zzzz qqqq", LINES[3]]
    scores = score_texts(model, tiny_tokenizer, lenses["logit"], reference, texts, detector="isolation-forest",
                         progress=False)
    assert int(np.argmax(scores)) == 1


def test_token_depth_and_training_correlation(model, lenses, tiny_tokenizer):
    traj = Trajectory.from_text(model, tiny_tokenizer, lenses["tuned"], ["To be, or not to be", "Fair"], k=1)
    depth = token_depths(traj)
    for b in range(2):
        for t in range(depth.shape[1]):
            if not traj.attention_mask[b, t]:
                assert depth[b, t] == -1
                continue
            tops = traj.top_ids[:, b, t, 0].tolist()  # the top-1 at layers 0 … 3
            assert depth[b, t] == min(s for s in range(4) if all(x == tops[-1] for x in tops[s:]))
    assert (depth[1, 2:] == -1).all()
    grid = depth_grid(traj, width=4)
    assert grid.shape[1] == 4 and grid.cell_text[-1][0]
    torch.manual_seed(5)
    early = tiny_model("llama").eval()
    ids = traj.input_ids[:1]
    found = depth_vs_training([early, model], model, lenses, ids, torch.ones_like(ids, dtype=torch.bool))
    assert found.checkpoints == 2 and set(found.rho) == {"logit", "tuned"}
    assert found.tokens == ids.numel()


def test_commands_write_json_csv_and_pictures(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    model = tiny_model("llama").eval()
    task_file = tmp_path / "task.jsonl"
    task_file.write_text("".join(json.dumps({"prompt": f"{line}?\nAnswer:", "choices": [" fog", " rain"], "gold": i % 2}) + "\n"
                                 for i, line in enumerate(LINES * 2)))
    loaded, tokenizer = load_model(str(tiny_model_dir))
    readouts = {"logit": LogitLens(loaded)}
    # The numbers are checked in the pipeline tests; here, that each command writes the library's for its inputs.
    out = tmp_path / "inject"
    assert main(["inject", "--model", str(tiny_model_dir), "--task", str(task_file), "--seeds", "2", "--shots", "0",
                 "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"injection.json", "injection.csv", "roc.png"}
    expected, _, _ = detect_injections(loaded, tokenizer, readouts, load_task(task_file), seeds=2, progress=False)
    written = json.loads((out / "injection.json").read_text())
    assert written == {"model": str(tiny_model_dir), **json.loads(json.dumps(expected.to_dict()))}
    out = tmp_path / "over"
    assert main(["overthink", "--model", str(tiny_model_dir), "--task", str(task_file), "--shots", "2",
                 "--limit", "10", "--demo-pool", "6", "--out", str(out)]) == 0
    expected, _, _ = overthinking(loaded, tokenizer, readouts, load_task(task_file, limit=16), shots=2, shift=1,
                                  limit=10, batch_size=4, progress=False)
    written = json.loads((out / "overthinking.json").read_text())
    assert written["examples"] == 10
    assert written == {"model": str(tiny_model_dir), **json.loads(json.dumps(expected.to_dict()))}
    out = tmp_path / "depth"
    assert main(["depth", "To be, or not to be", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    assert (out / "depth_logit.png").stat().st_size > 0
    shown = json.loads((out / "depth.json").read_text())["logit"]
    traj = Trajectory.from_text(model, tiny_tokenizer, LogitLens(model), "To be, or not to be", k=1)
    assert shown["depths"] == token_depths(traj)[0].tolist()
    assert shown["mean_depth"] == pytest.approx(float(np.mean(shown["depths"])))
    lens = TunedLens(model)
    lens.save_pretrained(tmp_path / "lens")
    picture = tmp_path / "pictures" / "depth.png"  # a picture file: logit and tuned side by side, nothing else
    assert main(["depth", "To be", "--model", str(tiny_model_dir), "--lens", str(tmp_path / "lens"), "--out", str(picture)]) == 0
    assert [p.name for p in picture.parent.iterdir()] == ["depth.png"] and picture.read_bytes()[:4] == b"\x89PNG"
    assert main(["depth", "--task", str(task_file), "--limit", "6", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    assert len(json.loads((out / "depth.json").read_text())["rows"]) == 6
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(LINES))
    assert main(["anomaly", "--reference", str(texts), "--texts", str(texts), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "anomaly")]) == 0
    written = json.loads((tmp_path / "anomaly" / "anomaly.json").read_text())["scores"]
    ranked = rank_texts(loaded, tokenizer, readouts["logit"], LINES, LINES, progress=False)
    assert [r["score"] for r in written] == pytest.approx(ranked.scores.tolist(), abs=1e-9)
    assert [r["percentile"] for r in written] == pytest.approx(ranked.percentiles.tolist(), abs=1e-9)
    assert main(["inject", "--model", str(tiny_model_dir), "--task", str(task_file), "--shots", "0", "--cue", "Reply:",
                 "--out", str(tmp_path / "x")]) == 2
    assert "no answer cue 'Reply:'" in capsys.readouterr().err
