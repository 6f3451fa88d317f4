"""Training claims of the README that no older test held: resume keeps the history and the clock
and runs only the remaining steps; ``--objective ce``; ``--init identity``; ``--minutes`` budgets
with the data repeating; gradient clipping; the Muon/Adam split; the evaluation at the end of
``depthlens train`` and ``depthlens eval``.

Each test was checked against a planted bug (see ``benchmarks/mutation.py``).
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import fields

import pytest
import torch
from tiny_models import tiny_model

from depthlens import LogitLens, TunedLens, capture, load_model
from depthlens.text.data import token_chunks
from depthlens.training.config import TrainConfig
from depthlens.training.optim import Float32Muon, make_optimizers
from depthlens.training.train import train

WORDS = ["fair", "foul", "when", "shall", "we", "three", "meet", "again", "in", "thunder", "lightning", "or", "rain",
         "hover", "through", "the", "fog", "and", "filthy", "air", "to", "be", "not", "that", "is", "question"]


def _every_step() -> dict:
    """Checkpoint after every step, whichever way this version of TrainConfig spells it."""
    names = {f.name for f in fields(TrainConfig)}
    return {"checkpoint_minutes": 0} if "checkpoint_minutes" in names else {"checkpoint_every": 1}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Made-up verse, 300 documents of 80 words, one per line of a .jsonl file."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "verse.jsonl"
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(80)) + "."}) for _ in range(300)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0, initializer_range=0.3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _config(model_dir, text, out, **changes) -> dict:
    return {"model": str(model_dir), "data": str(text), "out": str(out), "minutes": None, "tokens": 320,
            "chunk_len": 16, "batch_tokens": 32, "init_tokens": 256, "lr": 0.01, **_every_step(), **changes}


class Crash(Exception):
    """Stands for the process being killed."""


def test_resume_runs_only_the_remaining_steps_and_keeps_history_and_clock(model_dir, text, tmp_path, monkeypatch):
    import depthlens.training.train as training

    config = _config(model_dir, text, tmp_path / "run", tokens=320)  # 10 steps
    real = training.accumulate_gradients

    def slow(*args, **kwargs):  # charged time, so that the clock at the crash is clearly > 0
        time.sleep(0.15)
        return real(*args, **kwargs)

    at_crash = {}

    def crash_at_step_6(lens, progress):
        if progress["step"] == 6:
            at_crash.update(copy.deepcopy({k: progress[k] for k in ("step", "seconds", "history")}))
            raise Crash

    monkeypatch.setattr(training, "accumulate_gradients", slow)
    with pytest.raises(Crash):
        train(**config, on_step=crash_at_step_6)
    monkeypatch.setattr(training, "accumulate_gradients", real)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["progress"]
    assert state["step"] == 6 and at_crash["seconds"] > 0.9
    assert not (tmp_path / "run" / "lens").exists()

    seen = []
    result = train(**config, resume=True, on_step=lambda lens, progress: seen.append(
        (progress["step"], progress["seconds"])))
    steps = [step for step, _ in seen]
    assert min(steps) >= 6, f"the resumed run started over: it saw steps {steps}"
    assert [s for s in steps if s > 6] == [7, 8, 9, 10]
    assert result.steps == 10 and result.tokens == 320
    assert [h["step"] for h in result.history] == list(range(1, 11))
    assert result.history[:6] == at_crash["history"], "the history before the crash was not kept"
    assert all(seconds >= at_crash["seconds"] for _, seconds in seen), "the clock restarted at 0"
    assert result.seconds >= at_crash["seconds"]
    assert all(a["seconds"] <= b["seconds"] for a, b in zip(result.history, result.history[1:]))
    saved = TunedLens.from_pretrained(result.lens_path, tiny_model("llama", seed=0, initializer_range=0.3))
    assert saved.training_info["steps"] == 10


@pytest.fixture(scope="module")
def constant_text(tmp_path_factory, tiny_tokenizer):
    """One document of about 100 ``a``s: the tiny tokenizer makes it 100 equal tokens (six chunks
    of 16), so every chunk of every batch is the same whatever the order the data comes in, and
    a few steps use it all up."""
    for extra in range(50):
        path = tmp_path_factory.mktemp("constant") / "a.txt"
        path.write_text("a" * (100 + extra))
        if next(iter(token_chunks(str(path), tiny_tokenizer, 16, split="train")), None) is not None:
            return path
    pytest.fail("no length of the document lands in the train split")


def _identity_losses(model, chunk_len: int) -> dict[str, float]:
    """Summed over layers 0 … L-1 for the untrained (identity) lens on a batch of ``a`` chunks:
    the mean next-token cross-entropy and the mean KL(final ‖ lens)."""
    ids = torch.full((2, chunk_len), 67)
    states = capture(model, ids)
    final = states.logits.log_softmax(-1)
    ce = kl = 0.0
    for layer in range(states.num_layers):
        log_q = LogitLens(model)(states[layer], layer).log_softmax(-1)
        ce += -log_q[:, :-1, 67].mean().item()
        kl += (final.exp() * (final - log_q)).sum(-1).mean().item()
    return {"ce": ce, "kl": kl}


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_the_objective_is_the_loss_that_is_minimised(model_dir, constant_text, tmp_path, tiny_tokenizer, objective):
    """With ``init="identity"`` and ``lr=0`` the lens stays the logit lens, so the first step's
    loss is the chosen objective of the logit lens on that batch (all batches are equal here)."""
    assert tiny_tokenizer("aaaa").input_ids == [67] * 4
    result = train(**_config(model_dir, constant_text, tmp_path / objective, tokens=32, init="identity",
                             lr=0.0, shortlist=0, objective=objective))
    expected = _identity_losses(tiny_model("llama", seed=0, initializer_range=0.3), 16)
    assert expected["ce"] != pytest.approx(expected["kl"], rel=0.05)
    assert result.history[0]["loss"] == pytest.approx(expected[objective], rel=1e-4)


def test_init_identity_starts_from_the_logit_lens(model_dir, text, tmp_path):
    identity = train(**_config(model_dir, text, tmp_path / "identity", tokens=32, init="identity", lr=0.0))
    assert all(torch.count_nonzero(p) == 0 for p in identity.lens.parameters())
    fitted = train(**_config(model_dir, text, tmp_path / "fitted", tokens=32, lr=0.0))
    assert all(torch.count_nonzero(t.weight) > 0 for t in fitted.lens.translators)


def test_a_minutes_budget_runs_for_that_long_and_repeats_the_data(model_dir, constant_text, tmp_path, tiny_tokenizer):
    available = 16 * sum(1 for _ in token_chunks(str(constant_text), tiny_tokenizer, 16, split="train"))
    budget_s = 4.0
    began = time.monotonic()
    result = train(**_config(model_dir, constant_text, tmp_path / "run", tokens=None, minutes=budget_s / 60,
                             init="identity"))
    wall = time.monotonic() - began
    assert budget_s <= result.seconds < budget_s + 3.0
    assert result.seconds <= wall
    assert 0 < available <= 160 and result.tokens > available, f"{result.tokens} tokens trained, the split has {available}"
    assert result.steps == len(result.history) == result.tokens // 32


def test_gradients_are_clipped_to_the_given_norm(model_dir, text, tmp_path):
    """One SGD step from zero with Nesterov momentum 0.9 moves the parameters by 1.9 × lr × the
    clipped gradient; the gradient of this run is far larger than the clip."""
    common = dict(tokens=32, init="identity", optimizer="sgd", lr=1.0, warmup_steps=0, layer_lr_decay=0.0,
                  weight_decay=0.0, shortlist=0)
    clipped = train(**_config(model_dir, text, tmp_path / "clipped", clip=0.01, **common))
    norm = torch.cat([p.detach().flatten() for p in clipped.lens.parameters()]).norm().item()
    assert norm == pytest.approx(1.9 * 0.01, rel=1e-3)
    loose = train(**_config(model_dir, text, tmp_path / "loose", clip=1e6, **common))
    assert torch.cat([p.detach().flatten() for p in loose.lens.parameters()]).norm().item() > 0.1


def test_muon_gets_the_matrices_and_adam_the_biases():
    lens = TunedLens(tiny_model("llama"))
    muon, adam = make_optimizers(lens, TrainConfig(optimizer="muon"))
    assert isinstance(muon, Float32Muon) and isinstance(adam, torch.optim.Adam)
    in_muon = [p for group in muon.param_groups for p in group["params"]]
    in_adam = [p for group in adam.param_groups for p in group["params"]]
    assert [id(p) for p in in_muon] == [id(t.weight) for t in lens.translators]
    assert [id(p) for p in in_adam] == [id(t.bias) for t in lens.translators]
    assert all(p.ndim == 2 for p in in_muon) and all(p.ndim == 1 for p in in_adam)
    assert muon.param_groups[0]["lr"] == adam.param_groups[0]["lr"] == 0.01


def _eval_rows(path) -> dict[tuple, float]:
    table = json.loads((path / "eval.json").read_text())["table"]
    return {(r["lens"], r["layer"], r["metric"], r["unit"]): r["value"] for r in table}


def test_depthlens_train_evaluates_at_the_end_and_eval_reproduces_it(model_dir, text, tmp_path, capsys):
    from depthlens.analysis.evaluate import evaluate_held_out
    from depthlens.apps.cli import main

    run = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(text), "--out", str(run), "--tokens", "64",
            "--chunk-len", "16", "--batch-tokens", "32", "--init-tokens", "256", "--eval-tokens", "512"]
    assert main(argv) == 0
    out = "".join(capsys.readouterr().out.split())  # rich wraps lines at the terminal's width
    assert "tunedkl" in out and f"lenssavedto{run / 'lens'}" in out
    after_training = _eval_rows(run / "eval")
    assert {key[0] for key in after_training} == {"logit", "tuned"}
    assert {key[1] for key in after_training} == {0, 1, 2, 3}

    model, tokenizer = load_model(model_dir)
    lens = TunedLens.from_pretrained(run / "lens", model)
    direct = evaluate_held_out(model, tokenizer, {"logit": LogitLens(model), "tuned": lens}, str(text), tokens=512,
                               progress=False)
    for row in direct.table:
        assert after_training[(row["lens"], row["layer"], row["metric"], row["unit"])] == pytest.approx(row["value"])
    kl = {lens_name: [after_training[(lens_name, layer, "kl", "nats")] for layer in range(3)] for lens_name in ("logit", "tuned")}
    assert sum(kl["tuned"]) < sum(kl["logit"])

    assert main(["eval", "--model", str(model_dir), "--lens", str(run / "lens"), "--data", str(text),
                 "--tokens", "512", "--out", str(tmp_path / "again")]) == 0
    assert "tunedkl" in "".join(capsys.readouterr().out.split())
    assert _eval_rows(tmp_path / "again") == pytest.approx(after_training)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["curves.html", "curves.png", "eval.csv", "eval.json"]
