"""Training on a tiny model: closed-form start, KL steps, budgets, resume after SIGKILL, torchrun."""

import itertools
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
from depthlens.analysis.evaluate import evaluate_held_out
from depthlens.text.data import TextSource
from depthlens.training.closed_form import LeastSquares
from depthlens.training.train import TrainingError, train

SMALL = {"chunk_len": 16, "batch_tokens": 32, "init_tokens": 256, "checkpoint_minutes": 0, "lr": 0.01}


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


def test_the_ridge_penalises_the_translator_and_not_its_bias():
    """Ridge regression with a free intercept, written out another way: centre ``h`` and the target
    ``h_L − h``, then least squares on ``[X_c; √λ I] A = [Y_c; 0]`` with ``λ = ridge · mean diag(XᵀX)``,
    and ``b = ȳ − A x̄``. The states sit far from 0, so a penalised bias would show."""
    generator = torch.Generator().manual_seed(1)
    d, n, ridge = 6, 40, 0.3
    x = torch.randn(1, n, d, generator=generator, dtype=torch.float64) + 3.0
    final = x @ torch.randn(d, d, generator=generator, dtype=torch.float64).T + 2.0
    stats = LeastSquares(num_layers=1, d_model=d)
    stats.update([x, final])
    weight, bias = stats.solve(ridge=ridge)
    h, y = x[0], (final - x)[0]
    penalty = ridge * float(h.square().sum(0).mean())
    system = torch.cat([h - h.mean(0), penalty**0.5 * torch.eye(d, dtype=torch.float64)])
    target = torch.cat([y - y.mean(0), torch.zeros(d, d, dtype=torch.float64)])
    expected = torch.linalg.lstsq(system, target).solution.T
    torch.testing.assert_close(weight[0].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias[0].double(), y.mean(0) - expected @ h.mean(0), atol=1e-5, rtol=1e-5)
    assert (expected - stats.solve(ridge=0.0)[0][0].double()).abs().max() > 1e-2  # the ridge does matter here


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


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"chunk_len": 0}, "chunk_len must be at least 2"),
        ({"batch_tokens": 0}, r"batch_tokens \(0\) must be at least one chunk"),
        ({"init_tokens": 0}, "needs init_tokens ≥ chunk_len"),
        ({"checkpoint_minutes": -1.0}, "checkpoint_minutes must be ≥ 0"),
        ({"lr": -1.0}, "learning rate must be a number ≥ 0"),
        ({"clip": 0.0}, "gradient clipping must be positive"),
        ({"warmup_steps": -1}, "warmup_steps must be ≥ 0"),
        ({"ridge": -1.0}, "ridge penalty must be ≥ 0"),
        ({"tokens": None, "minutes": float("nan")}, "time budget must be positive"),
    ],
)
def test_settings_that_cannot_work_fail_before_any_work(model_dir, text, tmp_path, changes, message):
    with pytest.raises(TrainingError, match=message):
        train(**_config(model_dir, text, tmp_path / "run", **changes))
    assert not (tmp_path / "run").exists()


def test_an_unwritable_run_folder_fails_before_any_work(model_dir, text, tmp_path):
    from depthlens.errors import OutputError

    (tmp_path / "somefile.txt").write_text("x")
    with pytest.raises(OutputError, match="somefile.txt is a file, not a folder"):
        train(**_config(model_dir, text, tmp_path / "somefile.txt" / "run"))


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    from depthlens.errors import CheckpointError
    from depthlens.training.checkpoint import load_checkpoint, save_checkpoint

    small, large = torch.nn.Linear(2, 2), torch.nn.Linear(3, 3)
    save_checkpoint(tmp_path / "checkpoint", small, [torch.optim.Adam(small.parameters())], {"step": 1})
    assert load_checkpoint(tmp_path / "checkpoint", small, [torch.optim.Adam(small.parameters())]) == {"step": 1}
    with pytest.raises(CheckpointError, match="made for another model"):
        load_checkpoint(tmp_path / "checkpoint", large, [torch.optim.Adam(large.parameters())])
    with pytest.raises(CheckpointError, match="start without --resume"):
        load_checkpoint(tmp_path / "nothing", large, [])


def test_least_squares_without_tokens_is_a_training_error():
    with pytest.raises(TrainingError, match="no tokens were accumulated"):
        LeastSquares(num_layers=1, d_model=4).solve()


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
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600, check=False)
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
    real = training.train_step

    def recording(*args, lr_factor, **kwargs):
        factors.append(lr_factor)
        return real(*args, lr_factor=lr_factor, **kwargs)

    monkeypatch.setattr(training, "train_step", recording)
    train(**_config(model_dir, text, tmp_path / "run", tokens=320, warmup_steps=4))
    expected = [min(1.0, (step + 1) / 4) * (1.0 - step / 10) for step in range(10)]
    assert factors == pytest.approx(expected)


def test_checkpoints_follow_the_clock_and_the_last_one_is_light(model_dir, text, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import depthlens.training.train as training

    written = []
    real = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint", lambda *a, **k: written.append(a[3]["step"]) or real(*a, **k))
    result = train(**_config(model_dir, text, tmp_path / "hourly", tokens=320, checkpoint_minutes=60.0))
    assert written == [result.steps]
    final = load_file(tmp_path / "hourly" / "checkpoint" / "state.safetensors")
    assert not any(name.startswith("optim.") for name in final)
    assert json.loads((tmp_path / "hourly" / "checkpoint" / "state.json").read_text())["progress"]["complete"]
    written.clear()
    train(**_config(model_dir, text, tmp_path / "every", tokens=320, checkpoint_minutes=0.0))
    assert written == list(range(1, 11)) + [10]


def test_resuming_a_finished_run_changes_nothing(model_dir, text, tmp_path):
    first = train(**_config(model_dir, text, tmp_path / "run", tokens=320))
    before = _translators(tmp_path / "run")
    again = train(**_config(model_dir, text, tmp_path / "run", tokens=320), resume=True)
    assert again.steps == first.steps
    after = _translators(tmp_path / "run")
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_the_progress_shows_phases_steps_and_a_smoothed_loss(model_dir, text, tmp_path, capsys):
    from depthlens.training import progress

    config = progress.TrainConfig(minutes=2.0)
    bar = progress.steps_bar(config, {"seconds": 80.0, "tokens": 0}, disable=True)
    assert (bar.total, bar.n) == (40, 0)
    smoothed = progress.Smoothed()
    assert smoothed.add(5.0) == pytest.approx(5.0)
    values = [smoothed.add(v) for v in [-20.0, 30.0] * 50]
    assert all(v > -2.0 for v in values[5:])
    plan = progress.plan(config, {"step": 0, "initialised": False})
    assert plan.startswith("phase 1: least-squares start on") and "phase 2: KL steps" in plan
    assert "2 minutes in all" in plan and "checkpoints every 2 min and at the end" in plan
    result = train(**_config(model_dir, text, tmp_path / "run", tokens=320))
    err = capsys.readouterr().err
    assert "phase 1/2 · least-squares start" in err and "phase 2/2 · KL steps" in err
    assert f"step {result.steps}, KL/layer ≈" in err
    assert all("mean_layer_smoothed" in entry for entry in result.history)


def test_training_reads_the_documents_in_a_seeded_shuffled_order(model_dir, text, tmp_path):
    from depthlens.text.data import token_chunks
    from depthlens.training.train import TrainConfig, _batches

    _model, tokenizer = load_model(model_dir)
    config = TrainConfig(chunk_len=16, data=str(text))
    source = TextSource(str(text))
    first = [c.tolist() for c in itertools.islice(_batches(source, tokenizer, config, 0), 5)]
    plain = [c.tolist() for c in itertools.islice(token_chunks(source, tokenizer, 16), 5)]
    seeded = [c.tolist() for c in itertools.islice(token_chunks(source, tokenizer, 16, shuffle_seed=0), 5)]
    assert first == seeded != plain
    assert [c.tolist() for c in itertools.islice(_batches(source, tokenizer, config, 3), 2)] == first[3:5]


def test_the_command_reports_held_out_and_out_of_domain_evaluations(model_dir, text, tmp_path, capsys):
    from depthlens.apps.cli import main

    out = tmp_path / "run"
    options = ["--model", str(model_dir), "--data", str(text), "--out", str(out), "--tokens", "320",
               "--chunk-len", "16", "--batch-tokens", "32", "--init-tokens", "256", "--eval-tokens", "2048"]
    assert main(["train", *options]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "held-out (" in printed and "out-of-domain (mixed:dataset-descriptions, all split, 2040 tokens)" in printed
    held, ood = json.loads((out / "eval" / "eval.json").read_text()), json.loads((out / "eval" / "ood" / "eval.json").read_text())
    assert held["meta"]["split"] == "validation" and ood["meta"]["source"] == "mixed:dataset-descriptions"
    assert ood["intervals"] == "95% bootstrap intervals over 8 groups of chunks"
    assert main(["train", *options, "--ood", str(text)]) == 2
    assert "is the --data source itself" in capsys.readouterr().err


def test_the_least_squares_start_stops_at_its_share_of_a_time_budget(model_dir, text, tmp_path):
    result = train(**_config(model_dir, text, tmp_path / "run", tokens=None, minutes=0.05, init_tokens=96_000,
                             init_share=0.3))
    progress = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["progress"]
    assert 16 <= progress["init_tokens_used"] < 96_000
    assert result.steps >= 1 and progress["complete"]
