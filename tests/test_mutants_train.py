"""The training loop's bookkeeping, each on a tiny model with a known answer: the data check's
exact boundary, a fake clock that makes time budgets, checkpoints and the on_step allowance exact,
the recorded config and shares, ``train_lens``, and one ``train_step`` against a hand-computed
shortlist estimate at mid states and against the per-layer learning rates.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tiny_models import tiny_model

import depthlens.training.train as training
from depthlens import TunedLens, load_model
from depthlens.errors import OutputError
from depthlens.lenses.mid import MidTunedLens
from depthlens.model.hidden_states import capture
from depthlens.model.precision import FAST_BFLOAT16_ENV, resolve_dtype
from depthlens.text.data import TextSource, token_chunks
from depthlens.training.config import TrainConfig
from depthlens.training.optim import make_optimizers
from depthlens.training.progress import Smoothed
from depthlens.training.train import TrainingError, train, train_lens, train_step

WORDS = ["fair", "foul", "when", "shall", "we", "three", "meet", "again", "in", "thunder", "lightning", "or",
         "rain", "hover", "through", "the", "fog", "and", "filthy", "air", "to", "be", "not", "that", "question"]


def _verse(path: Path, documents: int, words: int) -> Path:
    """``documents`` lines of ``words`` made-up words each, as a .jsonl file."""
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n"
                            for _ in range(documents)))
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _verse(tmp_path_factory.mktemp("text") / "verse.jsonl", 100, 60)


@pytest.fixture(scope="module")
def short_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _verse(tmp_path_factory.mktemp("short") / "short.jsonl", 4, 10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0, initializer_range=0.3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[Any, Any]:
    return load_model(model_dir)


def _config(model_dir: Path, text: Path, out: Path, **changes: Any) -> dict[str, Any]:
    """Chunks of 16, batches of 2 chunks, a 64-token start and 2 steps unless changed."""
    return {"model": str(model_dir), "data": str(text), "out": str(out), "minutes": None, "tokens": 64,
            "chunk_len": 16, "batch_tokens": 32, "init_tokens": 64, "lr": 0.01, "checkpoint_minutes": 0, **changes}


def _progress(run: Path) -> dict[str, Any]:
    return json.loads((run / "checkpoint" / "state.json").read_text())["progress"]


class Clock:
    """A monotonic clock that moves only when a model forward pass moves it (or a test does)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def _fake_clock(monkeypatch: pytest.MonkeyPatch, seconds_per_forward: float) -> Clock:
    """Give the training module a clock on which every model forward takes ``seconds_per_forward``."""
    clock = Clock()
    real = training.capture

    def timed_capture(*args: Any, **kwargs: Any) -> Any:
        clock.now += seconds_per_forward
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "time", SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(training, "capture", timed_capture)
    return clock


# --- the data check ------------------------------------------------------------------------------------


def _train_chunks(source: Path, tokenizer: Any) -> int:
    return sum(1 for _ in token_chunks(str(source), tokenizer, 16, split="train"))


def test_the_data_check_counts_the_start_and_accepts_exactly_enough(short_text, loaded, tmp_path):
    """With ``n`` chunks of 16 in the train split, init identity and a budget of exactly ``16 n``
    tokens is accepted; with a least-squares start its ``init_tokens`` count too, so 64 more
    tokens need 4 more chunks than there are, and the message says so in numbers."""
    n = _train_chunks(short_text, loaded[1])
    assert 4 <= n <= 16
    tokens = 16 * n
    result = train(**_config("m", short_text, tmp_path / "identity", tokens=tokens, batch_tokens=16,
                             init="identity"), loaded=loaded)
    assert result.tokens == tokens and result.steps == n
    with pytest.raises(TrainingError) as refused:
        train(**_config("m", short_text, tmp_path / "fitted", tokens=tokens, batch_tokens=16), loaded=loaded)
    assert str(refused.value) == (
        f"the budget needs {tokens + 64} training tokens ({n + 4} chunks of 16) but {TextSource(str(short_text))} "
        f"has only {tokens} in its train split; lower --tokens, use more text, or pass --repeat-data to read it "
        "more than once")


def test_repeat_data_reads_the_split_again_in_a_new_order(short_text, loaded, tmp_path):
    """With ``repeat_data`` a budget of ``2n + 3`` chunks over an ``n``-chunk split is accepted and
    spent in full, one chunk per step; the second pass holds the first's tokens (but for the short
    tail that packing drops) in another order."""
    n = _train_chunks(short_text, loaded[1])
    seen: list[list[int]] = []
    real = training.capture

    def recording(model: Any, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.extend(chunk.tolist() for chunk in input_ids)
        return real(model, input_ids, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "capture", recording)
        result = train(**_config("m", short_text, tmp_path / "run", tokens=16 * (2 * n + 3), batch_tokens=16,
                                 init="identity", repeat_data=True), loaded=loaded)
    assert result.steps == 2 * n + 3 and len(seen) == 2 * n + 3
    first, second = (Counter(token for chunk in seen[start:start + n] for token in chunk) for start in (0, n))
    assert sum(((first - second) + (second - first)).values()) < 2 * 16 and seen[:n] != seen[n:2 * n]


def test_the_command_refuses_a_budget_past_the_data_and_repeats_it_when_told(model_dir, short_text, tiny_tokenizer,
                                                                              tmp_path, capsys):
    """``train --tokens`` one chunk past the split: one line naming ``--repeat-data``, exit 2, no run
    folder; with the flag it trains, and the lens's config records it."""
    from depthlens.apps.cli import main

    n, out = _train_chunks(short_text, tiny_tokenizer), tmp_path / "run"
    options = ["train", "--model", str(model_dir), "--data", str(short_text), "--tokens", str(16 * (n + 1)),
               "--chunk-len", "16", "--batch-tokens", "16", "--init", "identity", "--no-eval", "--out", str(out)]
    assert main(options) == 2
    assert "pass --repeat-data to read it more than once" in capsys.readouterr().err and not out.exists()
    assert main([*options, "--repeat-data"]) == 0
    config = json.loads((out / "lens" / "config.json").read_text())["training"]["config"]
    assert config["repeat_data"] is True and config["tokens"] == 16 * (n + 1)


def test_a_checkpoint_from_before_repeat_data_resumes(short_text, loaded, tmp_path):
    """A checkpoint whose config predates ``repeat_data`` is a run without it: resumed, not refused."""
    run = tmp_path / "run"
    first = train(**_config("m", short_text, run, tokens=32), loaded=loaded)
    state = run / "checkpoint" / "state.json"
    document = json.loads(state.read_text())
    del document["progress"]["config"]["repeat_data"]
    state.write_text(json.dumps(document))
    again = train(**_config("m", short_text, run, tokens=32), loaded=loaded, resume=True)
    assert again.steps == first.steps == 1
    with pytest.raises(TrainingError, match="other settings"):
        train(**_config("m", short_text, run, tokens=32, repeat_data=True), loaded=loaded, resume=True)


def test_one_token_past_the_data_is_refused_with_the_counts(short_text, loaded, tmp_path):
    """``16 n + 1`` tokens need ``n + 1`` chunks: refused, naming the tokens and chunks asked for."""
    n = _train_chunks(short_text, loaded[1])
    with pytest.raises(TrainingError, match=re.escape(f"needs {16 * n + 1} training tokens ({n + 1} chunks of 16) "
                                                      f"but")):
        train(**_config("m", short_text, tmp_path / "run", tokens=16 * n + 1, batch_tokens=16, init="identity"),
              loaded=loaded)
    assert not (tmp_path / "run").exists()


def test_a_file_where_the_run_folder_should_be_is_refused(text, loaded, tmp_path):
    """``out`` naming an existing file cannot become the run folder: refused before any work."""
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(OutputError, match="a file of that name exists; choose another output path"):
        train(**_config("m", text, tmp_path / "run"), loaded=loaded)
    assert (tmp_path / "run").read_text() == "not a folder"


# --- the clock -----------------------------------------------------------------------------------------


def test_a_time_budget_is_shared_between_the_start_and_the_steps(text, loaded, tmp_path, monkeypatch):
    """Each forward takes 10 s of a 1-minute budget and the start may use half of it (30 s): it reads
    groups of 2 chunks while the clock has not passed 30 s, so 4 groups (the clock is at 40 s), 128
    tokens. The steps then end at 50 s and 60 s, when the budget is spent."""
    _fake_clock(monkeypatch, 10.0)
    run = tmp_path / "run"
    result = train(**_config("m", text, run, tokens=None, minutes=1.0, init_tokens=256, init_share=0.5,
                             checkpoint_minutes=60.0), loaded=loaded)
    progress = _progress(run)
    assert progress["init_tokens_used"] == 128
    assert progress["chunks"] == 8 + 2 * 2
    assert result.steps == 2 and result.seconds == 60.0
    assert [entry["seconds"] for entry in result.history] == [50.0, 60.0]


def test_checkpoints_are_written_every_checkpoint_minutes_of_the_clock(text, loaded, tmp_path, monkeypatch):
    """Steps of 10 s and a checkpoint every half minute: after steps 3, 6 and 9 (30 s apart), then
    the final one after step 10."""
    _fake_clock(monkeypatch, 10.0)
    written: list[int] = []
    real = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint", lambda *a, **k: written.append(a[3]["step"]) or real(*a, **k))
    result = train(**_config("m", text, tmp_path / "run", tokens=320, init="identity", checkpoint_minutes=0.5),
                   loaded=loaded)
    assert result.steps == 10
    assert written == [3, 6, 9, 10]


def test_the_time_on_step_takes_is_never_charged(text, loaded, tmp_path, monkeypatch):
    """Forwards of 2.345 s (2 for the start, 2 steps), and an on_step that takes 100 s: training
    time is 4 × 2.345 = 9.38 s whatever on_step costs; the lens records it to 0.1 s (9.4)."""
    clock = _fake_clock(monkeypatch, 2.345)
    seen: list[float] = []

    def slow(lens: Any, progress: dict[str, Any]) -> None:
        seen.append(progress["seconds"])
        clock.now += 100.0

    result = train(**_config("m", text, tmp_path / "run"), loaded=loaded, on_step=slow)
    assert seen == pytest.approx([2 * 2.345, 3 * 2.345, 4 * 2.345], abs=1e-9)
    assert result.seconds == pytest.approx(9.38, abs=1e-9)
    assert [entry["seconds"] for entry in result.history] == pytest.approx([7.035, 9.38], abs=1.5e-3)
    assert result.lens.training_info["seconds"] == 9.4


# --- what a run records --------------------------------------------------------------------------------


def test_the_history_holds_whole_token_counts_and_the_smoothed_mean_loss(text, loaded, tmp_path):
    """Each step adds 32 tokens (an int: config.json says 96, not 96.0); mean_layer_smoothed is the
    smoothed per-layer mean (the summed loss over L layers), to 5 places."""
    result = train(**_config("m", text, tmp_path / "run", tokens=96), loaded=loaded)
    assert [entry["tokens"] for entry in result.history] == [32, 64, 96]
    assert all(type(entry["tokens"]) is int for entry in result.history) and type(result.tokens) is int
    saved = json.loads((result.lens_path / "config.json").read_text())["training"]
    assert type(saved["tokens"]) is int
    smoothed, layers = Smoothed(), result.lens.num_layers
    for entry in result.history:
        expected = smoothed.add(entry["loss"] / layers)
        assert entry["mean_layer_smoothed"] == pytest.approx(expected, abs=1e-5)
        assert entry["mean_layer_smoothed"] == round(entry["mean_layer_smoothed"], 5)
        assert entry["mean_layer_smoothed"] != round(entry["mean_layer_smoothed"])


def test_the_lens_records_its_config_with_a_portable_out_and_the_source_share(text, loaded, tmp_path, monkeypatch):
    """Run from tmp_path, ``out`` is recorded relative to it ("run"); the record has exactly the
    config's fields; a local file is all one source (share 1.0); the lens that on_step sees before
    the first step already carries the config; the start read exactly its 64 tokens (4 chunks)."""
    monkeypatch.chdir(tmp_path)
    config = _config("m", text, tmp_path / "run")
    early: list[dict[str, Any]] = []
    result = train(**config, loaded=loaded,
                   on_step=lambda lens, progress: early.append(json.loads(json.dumps(lens.training_info))))
    info = result.lens.training_info
    assert set(info["config"]) == {field.name for field in fields(TrainConfig)}
    assert info["config"] == {**asdict(TrainConfig(**config)), "out": "run"}
    assert info["sources"] == {str(TextSource(str(text))): 1.0}
    assert (info["steps"], info["tokens"], info["processes"], info["products"]) == (2, 64, 1, "float32")
    assert early[0] == {"config": asdict(TrainConfig(**config))}
    progress = _progress(tmp_path / "run")
    assert progress["init_tokens_used"] == 64 and progress["chunks"] == 4 + 4


def test_source_shares_are_recorded_to_four_places(text, loaded, tmp_path, monkeypatch):
    """The shares come from the run's own source, chunk length, chunks read (4 + 4) and seed, and
    are stored rounded to 4 places: 1/3 → 0.3333, 2/3 → 0.6667."""
    calls: list[tuple[Any, ...]] = []

    def shares(*args: Any) -> dict[str, float]:
        calls.append(args)
        return {"plays": 1 / 3, "verse": 2 / 3}

    monkeypatch.setattr(training, "token_shares", shares)
    result = train(**_config("m", text, tmp_path / "run", seed=3), loaded=loaded)
    assert result.lens.training_info["sources"] == {"plays": 0.3333, "verse": 0.6667}
    ((source, tokenizer, chunk_len, chunks, seed),) = calls
    assert source == TextSource(str(text)) and tokenizer is loaded[1]
    assert (chunk_len, chunks, seed) == (16, 8, 3)


def test_the_least_squares_bar_counts_tokens(text, loaded, tmp_path, capsys):
    """The phase-1 bar ends at 64/64 tokens (4 chunks of 16)."""
    train(**_config("m", text, tmp_path / "run"), loaded=loaded)
    err = capsys.readouterr().err
    assert re.search(r"least-squares start: 100%\|[^|\r\n]*\| 64/64 \[", err), err[-500:]


def test_auto_products_are_resolved_for_the_lens_device(text, loaded, tmp_path, monkeypatch):
    """``dtype="auto"`` with no override is what the CPU (where the lens lives) is fast at."""
    monkeypatch.delenv(FAST_BFLOAT16_ENV, raising=False)
    result = train(**_config("m", text, tmp_path / "run", tokens=32, dtype="auto"), loaded=loaded)
    assert result.lens.training_info["products"] == str(resolve_dtype("auto", "cpu")).removeprefix("torch.")


def test_a_checkpoint_older_than_recorded_configs_is_refused(text, loaded, tmp_path):
    """A checkpoint whose progress has no config at all cannot be shown to match: resume refuses it
    with the usual advice."""
    run = tmp_path / "run"
    train(**_config("m", text, run, tokens=32), loaded=loaded)
    state = run / "checkpoint" / "state.json"
    document = json.loads(state.read_text())
    del document["progress"]["config"]
    state.write_text(json.dumps(document))
    with pytest.raises(TrainingError, match="belongs to a run with other settings; start without --resume"):
        train(**_config("m", text, run, tokens=32), loaded=loaded, resume=True)


# --- train_lens ----------------------------------------------------------------------------------------


def test_train_lens_trains_the_model_in_memory_at_its_site(tmp_path, text, tiny_tokenizer):
    """A mid lens of a tiny GPT-2 (128 positions) already in memory: the result holds that very
    model, a MidTunedLens saved under ``out``, and a config naming the model's folder, the data
    and the budget as given (the options as well)."""
    folder = tmp_path / "gpt2"
    tiny_model("gpt2", seed=0).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    model, tokenizer = load_model(folder)
    result = train_lens(model, tokenizer, text, 64, site="mid", out=tmp_path / "out", chunk_len=16,
                        batch_tokens=32, init_tokens=64, checkpoint_minutes=0)
    assert result.model is model and result.tokenizer is tokenizer
    assert type(result.lens) is MidTunedLens
    assert result.lens_path == tmp_path / "out" / "lens" and (result.lens_path / "config.json").is_file()
    recorded = result.lens.training_info["config"]
    assert (recorded["model"], recorded["data"], recorded["site"]) == (str(folder), str(text), "mid")
    assert (recorded["tokens"], recorded["minutes"], recorded["chunk_len"]) == (64, None, 16)
    assert result.steps == 2


# --- one step ------------------------------------------------------------------------------------------


def _batch(text: Path, tokenizer: Any) -> torch.Tensor:
    chunks = token_chunks(str(text), tokenizer, 16, split="train", max_chunks=2)
    return torch.stack(list(chunks))


def test_a_step_estimates_the_kl_at_mid_states_on_the_shortlist(text, loaded):
    """A fresh mid lens is the logit lens at mid states. With a shortlist of the 4 most likely final
    tokens of every position and no sampled negatives, layer l's loss per token is
    ``Σ_v p log p − Σ_{v∈S} p_v z_v + log Σ_{v∈S} e^{z_v}`` with ``z`` the lens logits (the KL
    estimate of the whole vocabulary's normaliser from the shortlist alone)."""
    model, tokenizer = loaded
    batch = _batch(text, tokenizer)
    lens = MidTunedLens(model)
    config = TrainConfig(shortlist=4, negatives=0, lr=0.0, clip=None)
    losses = train_step(lens, model, batch, make_optimizers(lens, config), config)
    with torch.no_grad():
        states = capture(model, batch, site="mid")
        log_p = states.logits.reshape(32, -1).float().log_softmax(-1)
        shortlist = log_p.topk(4, dim=-1).indices.unique()
        expected = []
        for layer in range(lens.num_layers):
            z = lens(states[layer].reshape(32, -1), layer).float()
            per_token = ((log_p.exp() * log_p).sum(-1) - (log_p.exp()[:, shortlist] * z[:, shortlist]).sum(-1)
                         + z[:, shortlist].logsumexp(-1))
            expected.append(per_token.mean().item())
    assert losses.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_each_layer_steps_with_its_own_learning_rate(text, loaded):
    """``lr · lr_factor · (1 − layer_lr_decay · l / L)`` for the weight and bias of layer l:
    0.01 · 0.5 · (1 − 0.6 l / 3)."""
    model, tokenizer = loaded
    lens = TunedLens(model)
    config = TrainConfig(lr=0.01, layer_lr_decay=0.6, optimizer="adam")
    (adam,) = optimizers = make_optimizers(lens, config)
    train_step(lens, model, _batch(text, tokenizer), optimizers, config, lr_factor=0.5)
    expected = [0.005 * (1 - 0.6 * layer / 3) for layer in range(3)]
    assert [group["lr"] for group in adam.param_groups] == pytest.approx(expected * 2, rel=1e-12)


def _poison_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make one gradient entry infinite after the losses (all finite) are summed."""
    real = training.accumulate_gradients

    def poisoned(lens: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        losses = real(lens, *args, **kwargs)
        lens.translators[1].weight.grad[0, 0] = float("inf")
        return losses

    monkeypatch.setattr(training, "accumulate_gradients", poisoned)


def test_a_non_finite_gradient_with_finite_losses_is_named_as_such(text, loaded, tmp_path, monkeypatch):
    """Every loss finite but one gradient infinite: the error says "gradients only" and where the
    last good checkpoint is."""
    model, tokenizer = loaded
    _poison_gradient(monkeypatch)
    lens = TunedLens(model)
    config = TrainConfig(out=str(tmp_path / "run"))
    with pytest.raises(TrainingError, match=re.escape(
            f"the loss became non-finite (layers gradients only); the last good checkpoint is kept in "
            f"{tmp_path / 'run' / 'checkpoint'}. Lower")):
        train_step(lens, model, _batch(text, tokenizer), make_optimizers(lens, config), config)


def test_a_one_block_model_gets_its_one_translator_fitted(text, tmp_path, tiny_tokenizer):
    """A model of a single block has a single translator; with ``lr=0`` it stays the ridge fit of the
    start, made on the first 4 chunks of the seeded order (epoch 0 uses ``shuffle_seed=seed``)."""
    from depthlens.training.closed_form import LeastSquares

    model = tiny_model("llama", seed=1, num_hidden_layers=1, initializer_range=0.3)
    result = train(**_config("m", text, tmp_path / "run", tokens=32, lr=0.0), loaded=(model, tiny_tokenizer))
    assert len(result.lens.translators) == 1 and result.steps == 1
    chunks = list(token_chunks(str(text), tiny_tokenizer, 16, split="train", shuffle_seed=0, max_chunks=4))
    stats = LeastSquares(num_layers=1, d_model=32)
    for pair in (chunks[:2], chunks[2:]):  # batches of 2 chunks, as the start reads them
        stats.update(capture(model, torch.stack(pair)).states)
    weight, bias = stats.solve(ridge=TrainConfig.ridge)
    torch.testing.assert_close(result.lens.translators[0].weight.detach(), weight[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.lens.translators[0].bias.detach(), bias[0], rtol=1e-5, atol=1e-5)
