"""Train a tuned lens: closed-form start, then KL distillation with Muon or the paper's SGD.

The job, in order:

1. load the model and stream the training split of the text source as packed chunks;
2. ``init="least_squares"``: fit every translator by ridge regression onto the last residual
   state from the first ``init_tokens`` tokens (:mod:`depthlens.training.closed_form`);
3. KL steps until the budget (tokens or wall-clock minutes) is spent: one model forward per batch,
   then a per-layer forward/backward of the lens (:mod:`depthlens.training.objective`), an optimizer step
   and a linearly decaying learning rate;
4. save the lens, and checkpoint periodically so that ``resume=True`` continues exactly.

Under ``torchrun`` every process takes its own share of each batch and gradients are averaged
(gloo on CPU, nccl on GPU); process 0 writes files.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from depthlens.training.checkpoint import load_checkpoint, save_checkpoint
from depthlens.training.closed_form import LeastSquares
from depthlens.text.data import TextSource, token_chunks
from depthlens.errors import TrainingError
from depthlens.model.hidden_states import capture
from depthlens.lenses.lens import TunedLens
from depthlens.model.load import DEFAULT_MODEL, load_model
from depthlens.training.objective import Objective, Shortlist, accumulate_gradients
from depthlens.training.optim import muon

Optimizer = Literal["muon", "adam", "sgd"]
Init = Literal["least_squares", "identity"]

DEFAULT_LR: dict[str, float] = {"muon": 0.01, "adam": 0.01, "sgd": 1.0}


def run_dir(model: str) -> Path:
    """Where a run on ``model`` writes by default: ``runs/<model name>``."""
    return Path("runs") / Path(model.rstrip("/")).name.removesuffix(".gguf")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the lens's ``config.json``)."""

    model: str = DEFAULT_MODEL
    data: str = "shakespeare"
    column: str = "text"
    out: str | None = None
    """Run directory (``lens/``, ``checkpoint/``, ``eval/`` go inside); default ``runs/<model>``."""
    objective: Objective = "kl"
    optimizer: Optimizer = "adam"
    init: Init = "least_squares"
    init_tokens: int = 8192
    ridge: float = 1e-4
    chunk_len: int = 256
    batch_tokens: int = 256
    shortlist: int = 8
    """Estimate the KL on a shortlist of the vocabulary: the final distribution's ``shortlist``
    most likely tokens at every position of a batch, plus ``negatives`` sampled ones
    (:class:`~depthlens.training.objective.Shortlist`); 0 computes the exact KL over the whole vocabulary."""
    negatives: int = 512
    tokens: int | None = None
    """Budget of KL-step tokens (all processes together); exclusive with ``minutes``."""
    minutes: float | None = 8.0
    """Budget of wall-clock minutes for initialisation plus KL steps."""
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float | None = 1.0
    warmup_steps: int = 20
    """Steps over which the learning rate rises linearly to its peak (then it decays linearly to 0)."""
    layer_lr_decay: float = 0.7
    """Layer ``l``'s learning rate is ``lr · (1 − layer_lr_decay · l / L)``."""
    checkpoint_every: int = 10
    seed: int = 0

    @property
    def run_path(self) -> Path:
        return Path(self.out) if self.out else run_dir(self.model)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def check(self) -> None:
        """Raise :class:`TrainingError` for settings that cannot work."""
        if (self.tokens is None) == (self.minutes is None):
            raise TrainingError("give exactly one budget: tokens or minutes")
        if self.tokens is not None and self.tokens < self.batch_tokens:
            raise TrainingError(f"the token budget ({self.tokens}) is smaller than one batch ({self.batch_tokens} tokens)")
        if self.minutes is not None and self.minutes <= 0:
            raise TrainingError(f"the time budget must be positive, got {self.minutes} minutes")
        if self.batch_tokens % self.chunk_len or self.init_tokens % self.chunk_len:
            raise TrainingError(f"batch_tokens and init_tokens must be multiples of chunk_len ({self.chunk_len})")
        if self.optimizer not in DEFAULT_LR:
            raise TrainingError(f"unknown optimizer {self.optimizer!r}; use muon, adam or sgd")
        if not 0.0 <= self.layer_lr_decay < 1.0:
            raise TrainingError(f"layer_lr_decay must be in [0, 1), got {self.layer_lr_decay}")
        if self.shortlist < 0 or self.negatives < 0:
            raise TrainingError(f"--shortlist and --negatives must be ≥ 0, got {self.shortlist} and {self.negatives}")
        if self.objective not in ("kl", "ce"):
            raise TrainingError(f"unknown objective {self.objective!r}; use kl or ce")
        if self.init not in ("least_squares", "identity"):
            raise TrainingError(f"unknown init {self.init!r}; use least_squares or identity")


@dataclass
class TrainResult:
    """What a finished run produced."""

    lens: TunedLens
    lens_path: Path
    model: torch.nn.Module
    tokenizer: Any
    steps: int
    tokens: int
    seconds: float
    history: list[dict[str, float]]


class _Processes:
    """This process's place among ``torchrun`` workers (a single process if not launched so)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def from_first(self, value: float) -> float:
        """``value`` as process 0 sees it, so that every process takes the same decision."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(tensor, src=0)
        return tensor.item()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _batches(source: TextSource, tokenizer: Any, config: TrainConfig, skip: int) -> Iterator[torch.Tensor]:
    """Chunks of the training split, repeated epoch after epoch, starting after ``skip`` chunks."""
    def forever() -> Iterator[torch.Tensor]:
        for _epoch in itertools.count():
            yield from token_chunks(source, tokenizer, config.chunk_len, split="train")

    return itertools.islice(forever(), skip, None)


def _check_data(source: TextSource, tokenizer: Any, config: TrainConfig) -> None:
    """Fail before any work if the budget needs more chunks than the training split has (a time
    budget needs the initialisation and one batch; later batches repeat the data)."""
    needed = (config.init_tokens if config.init == "least_squares" else 0) + (config.tokens or config.batch_tokens)
    needed_chunks = math.ceil(needed / config.chunk_len)
    available = sum(1 for _ in token_chunks(source, tokenizer, config.chunk_len, split="train", max_chunks=needed_chunks))
    if available < needed_chunks:
        raise TrainingError(
            f"the budget needs {needed} training tokens ({needed_chunks} chunks of {config.chunk_len}) but "
            f"{source} has only {available * config.chunk_len} in its train split; lower --tokens or use more text"
        )


def make_optimizers(lens: TunedLens, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """The paper's SGD for all parameters, Adam for all parameters, or Muon for the translator
    matrices and Adam for the biases (Muon only orthogonalises matrices).

    Every layer's parameters form their own group whose learning rate is scaled by
    ``1 − layer_lr_decay · l / L`` (the ``layer_scale`` of the group): late layers start close to
    the final layer and want smaller steps than early ones.
    """
    def groups(parameters: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [{"params": [p], "layer_scale": 1.0 - config.layer_lr_decay * layer / lens.num_layers}
                for layer, p in enumerate(parameters)]

    weights = groups([t.weight for t in lens.translators])
    biases = groups([t.bias for t in lens.translators])
    lr = config.learning_rate
    if config.optimizer == "sgd":
        return [torch.optim.SGD(weights + biases, lr=lr, momentum=config.momentum, nesterov=True,
                                weight_decay=config.weight_decay)]
    if config.optimizer == "adam":
        return [torch.optim.Adam(weights + biases, lr=lr)]
    return [muon(weights, lr), torch.optim.Adam(biases, lr=lr)]


def _least_squares_start(
    lens: TunedLens, model: torch.nn.Module, batches: Iterator[torch.Tensor], config: TrainConfig, procs: _Processes
) -> int:
    """Fit every translator in closed form; returns the number of chunks consumed (all ranks)."""
    stats = LeastSquares(lens.num_layers, lens.parts.d_model)
    per_rank = config.batch_tokens // config.chunk_len
    total_chunks = config.init_tokens // config.chunk_len
    consumed = 0
    with tqdm(total=config.init_tokens, desc="least-squares start", unit="tok", disable=procs.rank != 0) as bar:
        while consumed < total_chunks:
            group = list(itertools.islice(batches, min(per_rank * procs.world, total_chunks - consumed)))
            consumed += len(group)
            mine = group[procs.rank :: procs.world]
            if mine:
                stats.update(capture(model, torch.stack(mine), parts=lens.parts).states)
            bar.update(len(group) * config.chunk_len)
    procs.sum_(stats.xtx)
    procs.sum_(stats.xty)
    stats.tokens = consumed * config.chunk_len
    stats.apply(lens, config.ridge)
    return consumed


def train(
    config: TrainConfig | None = None,
    *,
    loaded: tuple[Any, Any] | None = None,
    on_step: Callable[[TunedLens, dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a tuned lens as configured and save it to ``<run>/lens``.

    Keyword ``overrides`` replace fields of ``config`` (or of the defaults). ``resume=True``
    continues from ``<run>/checkpoint``. ``loaded=(model, tokenizer)`` reuses a model already in
    memory instead of loading ``config.model``. ``on_step(lens, progress)`` is called after the
    closed-form start (step 0) and after every step, with ``progress["seconds"]`` the training
    time so far; the time it takes is not counted against the budget (use it to evaluate along
    the way).
    """
    resume = bool(overrides.pop("resume", False))
    config = TrainConfig(**{**(asdict(config) if config else {}), **overrides})
    config.check()
    procs = _Processes()
    torch.manual_seed(config.seed)
    model, tokenizer = loaded or load_model(config.model, device=procs.device)
    source = TextSource(config.data, column=config.column)
    _check_data(source, tokenizer, config)
    lens = TunedLens(model, training={"config": asdict(config)})
    optimizers = make_optimizers(lens, config)
    run = config.run_path
    progress: dict[str, Any] = {"step": 0, "chunks": 0, "tokens": 0, "seconds": 0.0, "initialised": False, "history": []}
    if resume:
        progress = load_checkpoint(run / "checkpoint", lens, optimizers)
        if progress.get("config") != asdict(config):
            raise TrainingError(f"the checkpoint in {run / 'checkpoint'} belongs to a run with other settings; start without --resume")
    progress["config"] = asdict(config)
    batches = _batches(source, tokenizer, config, progress["chunks"])
    started = time.monotonic() - progress["seconds"]

    if config.init == "least_squares" and not progress["initialised"]:
        progress["chunks"] += _least_squares_start(lens, model, batches, config, procs)
        progress["initialised"] = True
    progress["seconds"] = time.monotonic() - started
    started += _call(on_step, lens, progress)

    exact = config.objective == "ce" or not config.shortlist
    per_rank_chunks = config.batch_tokens // config.chunk_len
    step_tokens = config.batch_tokens * procs.world
    bar = tqdm(total=config.tokens or round(config.minutes * 60), desc=f"{config.objective.upper()} steps",
               unit="tok" if config.tokens else "s", disable=procs.rank != 0)
    while True:
        done = procs.from_first(_budget_used(config, progress, step_tokens))
        if done >= 1.0:
            break
        group = list(itertools.islice(batches, per_rank_chunks * procs.world))
        batch = torch.stack(group[procs.rank * per_rank_chunks : (procs.rank + 1) * per_rank_chunks])
        warmup = min(1.0, (progress["step"] + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        losses = _step(lens, model, batch, optimizers, config, procs, lr_factor=warmup * (1.0 - done))
        progress["step"] += 1
        progress["chunks"] += len(group)
        progress["tokens"] += step_tokens
        progress["seconds"] = time.monotonic() - started
        progress["history"].append({"step": progress["step"], "tokens": progress["tokens"],
                                    "seconds": round(progress["seconds"], 3), "loss": losses.sum().item()})
        bar.n = min(bar.total, progress["tokens"] if config.tokens else round(progress["seconds"]))
        bar.refresh()
        bar.set_postfix({"loss" if exact else "loss (estimate)": f"{losses.sum().item():.3f}",
                         "mean_layer": f"{losses.mean().item():.3f}"})
        if progress["step"] % config.checkpoint_every == 0:
            _checkpoint(run, lens, optimizers, progress, procs)
        started += _call(on_step, lens, progress)
    bar.close()
    _checkpoint(run, lens, optimizers, progress, procs)
    lens.training_info = {"config": asdict(config), "steps": progress["step"], "tokens": progress["tokens"],
                          "seconds": round(progress["seconds"], 1), "processes": procs.world}
    if procs.rank == 0:
        lens.save_pretrained(run / "lens")
    procs.barrier()
    return TrainResult(lens, run / "lens", model, tokenizer, progress["step"], progress["tokens"], progress["seconds"], progress["history"])


def _call(on_step: Callable[[TunedLens, dict[str, Any]], None] | None, lens: TunedLens, progress: dict[str, Any]) -> float:
    """Run the callback, if any; returns the seconds it took."""
    if on_step is None:
        return 0.0
    begun = time.monotonic()
    on_step(lens, progress)
    return time.monotonic() - begun


def _budget_used(config: TrainConfig, progress: dict[str, Any], step_tokens: int) -> float:
    """Fraction of the budget spent; a token budget ends before a step that would overshoot it."""
    if config.tokens is not None:
        return 1.0 if progress["tokens"] + step_tokens > config.tokens else progress["tokens"] / config.tokens
    return progress["seconds"] / (config.minutes * 60)


def _step(
    lens: TunedLens,
    model: torch.nn.Module,
    batch: torch.Tensor,
    optimizers: list[torch.optim.Optimizer],
    config: TrainConfig,
    procs: _Processes,
    lr_factor: float,
) -> torch.Tensor:
    """One optimisation step on ``batch [chunks, chunk_len]``; returns the mean loss per layer."""
    states = capture(model, batch, parts=lens.parts)
    flat = [s.reshape(-1, s.shape[-1]) for s in states.states]
    if config.objective == "kl":
        target = states.logits.reshape(flat[0].shape[0], -1).float().log_softmax(-1)
    else:
        target = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], dim=1).reshape(-1).to(flat[0].device)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=False)
    tokens = torch.tensor(float((target != -100).sum() if config.objective == "ce" else target.shape[0]))
    procs.sum_(tokens)
    with _autocast(flat[0].device):
        shortlist = Shortlist(config.shortlist, config.negatives) if config.shortlist else None
        losses = accumulate_gradients(lens, flat, target, objective=config.objective, scale=1.0 / tokens.item(),
                                      shortlist=shortlist)
    procs.sum_(losses)
    losses /= tokens.item()
    for parameter in lens.parameters():
        procs.sum_(parameter.grad)
    if not torch.isfinite(losses).all() or not all(torch.isfinite(p.grad).all() for p in lens.parameters()):
        bad = [layer for layer, value in enumerate(losses.tolist()) if not math.isfinite(value)]
        raise TrainingError(
            f"the loss became non-finite (layers {bad or 'gradients only'}); the last good checkpoint is kept in "
            f"{config.run_path / 'checkpoint'}. Lower the learning rate (--lr) and run again with --resume"
        )
    if config.clip is not None:
        torch.nn.utils.clip_grad_norm_(lens.parameters(), config.clip)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * lr_factor * group["layer_scale"]
        optimizer.step()
    return losses


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast where bf16 is fast (CUDA with bf16 support); float32 elsewhere, CPU included."""
    fast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast)


def _checkpoint(run: Path, lens: TunedLens, optimizers: list[torch.optim.Optimizer], progress: dict[str, Any], procs: _Processes) -> None:
    if procs.rank == 0:
        save_checkpoint(run / "checkpoint", lens, optimizers, progress)
    procs.barrier()
