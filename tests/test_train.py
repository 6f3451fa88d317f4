"""Training on a tiny model: closed-form start, KL steps, budgets, resume after SIGKILL, torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from depthlens import LogitLens, TunedLens, load_model
from depthlens.training.closed_form import LeastSquares
from depthlens.text.data import TextSource
from depthlens.analysis.evaluate import evaluate_held_out
from depthlens.training.train import TrainingError, train

SMALL = dict(chunk_len=16, batch_tokens=32, init_tokens=256, checkpoint_every=1, lr=0.01)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Four tragedies from the built-in corpus as a local .jsonl file (~600 kB, one scene a line)."""
    plays = ("Macbeth", "Hamlet", "Othello", "King Lear")
    corpus = TextSource("shakespeare")
    scenes = [d for split in ("train", "validation") for d in corpus.documents(split) if d.startswith(plays)]
    path = tmp_path_factory.mktemp("text") / "macbeth.jsonl"
    path.write_text("".join(json.dumps({"text": scene}) + "\n" for scene in scenes))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0, initializer_range=0.3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _config(model_dir, text, out, **changes):
    return {"model": str(model_dir), "data": str(text), "out": str(out), "minutes": None, "tokens": 320, **SMALL, **changes}


def test_least_squares_recovers_an_exact_affine_map():
    torch.manual_seed(0)
    d, n = 8, 500
    x = torch.randn(1, n, d)
    m, c = torch.randn(d, d), torch.randn(d)
    final = x @ m.T + c
    stats = LeastSquares(num_layers=1, d_model=d)
    stats.update([x[:, :250], final[:, :250]])
    half = LeastSquares(num_layers=1, d_model=d)
    half.update([x[:, 250:], final[:, 250:]])
    stats.merge(half)
    weight, bias = stats.solve(ridge=0.0)
    assert torch.allclose(weight[0], m - torch.eye(d), atol=1e-4)
    assert torch.allclose(bias[0], c, atol=1e-4)


def test_training_beats_the_logit_lens_and_saves_the_lens(model_dir, text, tmp_path):
    result = train(**_config(model_dir, text, tmp_path / "run", tokens=640))
    assert result.steps == 20 and result.tokens == 640
    assert (tmp_path / "run" / "lens" / "model.safetensors").is_file()
    model, tokenizer = load_model(model_dir)
    loaded = TunedLens.from_pretrained(result.lens_path, model)
    assert loaded.training_info["steps"] == 20
    report = evaluate_held_out(model, tokenizer, {"logit": LogitLens(model), "tuned": loaded}, str(text),
                               tokens=256, chunk_len=16, progress=False)
    logit, tuned = report.mean("logit", "kl"), report.mean("tuned", "kl")
    assert sum(tuned[:-1]) < 0.85 * sum(logit[:-1])
    assert logit[-1] == pytest.approx(0.0, abs=1e-5) and tuned[-1] == pytest.approx(0.0, abs=1e-5)


def test_kl_steps_improve_on_the_closed_form_start(model_dir, text, tmp_path):
    model, tokenizer = load_model(model_dir)
    start = TunedLens.from_pretrained(train(**_config(model_dir, text, tmp_path / "a", tokens=32, lr=0.0)).lens_path, model)
    tuned = TunedLens.from_pretrained(train(**_config(model_dir, text, tmp_path / "b", tokens=640)).lens_path, model)
    report = evaluate_held_out(model, tokenizer, {"start": start, "tuned": tuned}, str(text), tokens=256,
                               chunk_len=16, progress=False)
    assert sum(report.mean("tuned", "kl")) < sum(report.mean("start", "kl"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokens": 10_000_000}, "has only"),
        ({"tokens": 320, "minutes": 1.0}, "exactly one budget"),
        ({"optimizer": "adamw"}, "unknown optimizer"),
        ({"batch_tokens": 20}, "multiples of chunk_len"),
        ({"shortlist": -1}, "--shortlist and --negatives must be ≥ 0"),
        ({"layer_lr_decay": 1.5}, r"layer_lr_decay must be in \[0, 1\)"),
    ],
)
def test_bad_budgets_fail_before_any_work(model_dir, text, tmp_path, changes, message):
    with pytest.raises(TrainingError, match=message):
        train(**_config(model_dir, text, tmp_path / "run", **changes))
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(model_dir, text, tmp_path, monkeypatch):
    import depthlens.training.train as training

    real = training.accumulate_gradients
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        return losses * float("nan") if calls["n"] == 4 else losses

    monkeypatch.setattr(training, "accumulate_gradients", poisoned)
    with pytest.raises(TrainingError, match="non-finite.*last good checkpoint"):
        train(**_config(model_dir, text, tmp_path / "run"))
    progress = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["progress"]
    assert progress["step"] == 3
    assert not (tmp_path / "run" / "lens").exists()


def _train_in_subprocess(config: dict, resume: bool = False) -> subprocess.Popen:
    code = f"from depthlens.training.train import train; train(**{config!r}, resume={resume})"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _translators(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "lens" / "model.safetensors")


def test_resume_after_sigkill_gives_the_same_lens(model_dir, text, tmp_path):
    config = _config(model_dir, text, tmp_path / "killed", tokens=1280, optimizer="muon")
    run = _train_in_subprocess(config)
    state = tmp_path / "killed" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state.is_file() and json.loads(state.read_text())["progress"]["step"] >= 8:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed_at = json.loads(state.read_text())["progress"]["step"]
    assert 8 <= killed_at < 40 and not (tmp_path / "killed" / "lens").exists()

    resumed = _train_in_subprocess(config, resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    straight = _train_in_subprocess({**config, "out": str(tmp_path / "straight")})
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()
    a, b = _translators(tmp_path / "killed"), _translators(tmp_path / "straight")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_resume_refuses_a_checkpoint_with_other_settings(model_dir, text, tmp_path):
    train(**_config(model_dir, text, tmp_path / "run", tokens=64))
    with pytest.raises(TrainingError, match="other settings"):
        train(**_config(model_dir, text, tmp_path / "run", tokens=64, lr=0.5), resume=True)


def test_torchrun_with_two_processes_matches_one(model_dir, text, tmp_path):
    config = _config(model_dir, text, tmp_path / "single", tokens=640, batch_tokens=64, optimizer="sgd", lr=0.5,
                     shortlist=0)
    train(**config)
    ddp = {**config, "out": str(tmp_path / "ddp"), "batch_tokens": 32}
    args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in ddp.items() if k not in ("minutes",))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29512",
               "-m", "depthlens.apps.cli", "train", *args.split(), "--no-eval"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _translators(tmp_path / "single"), _translators(tmp_path / "ddp")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_on_step_sees_every_step_and_its_time_is_not_charged(model_dir, text, tmp_path):
    seen = []

    def slow_callback(lens, progress):
        seen.append(progress["step"])
        time.sleep(0.2)

    result = train(**_config(model_dir, text, tmp_path / "run", tokens=320), on_step=slow_callback)
    assert seen == list(range(result.steps + 1))
    assert result.seconds < 0.2 * len(seen)


def test_learning_rates_shrink_with_depth_warm_up_and_decay(model_dir, text, tmp_path, monkeypatch):
    import depthlens.training.train as training

    model, _ = load_model(model_dir)
    lens = TunedLens(model)
    (adam,) = training.make_optimizers(lens, training.TrainConfig(optimizer="adam", layer_lr_decay=0.6))
    scales = [group["layer_scale"] for group in adam.param_groups[: lens.num_layers]]
    assert scales == pytest.approx([1.0 - 0.6 * layer / lens.num_layers for layer in range(lens.num_layers)])

    factors = []
    real = training._step

    def recording(*args, lr_factor, **kwargs):
        factors.append(lr_factor)
        return real(*args, lr_factor=lr_factor, **kwargs)

    monkeypatch.setattr(training, "_step", recording)
    train(**_config(model_dir, text, tmp_path / "run", tokens=320, warmup_steps=4))
    expected = [min(1.0, (step + 1) / 4) * (1.0 - step / 10) for step in range(10)]
    assert factors == pytest.approx(expected)
