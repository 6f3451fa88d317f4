"""Train a tuned lens: closed-form start, then KL distillation with Adam (default), Muon or SGD.

``site="block"`` (the default) trains translators of the block outputs
(:class:`~depthlens.lenses.tuned.TunedLens`); ``site="mid"`` trains them, by the same recipe, at
the mid states ``resid.i + attn.i`` after each block's attention
(:class:`~depthlens.lenses.mid.MidTunedLens`). :func:`train_lens` trains either on a model already
in memory, with a token budget.

The job, in order:

1. load the model and stream the training split of the text source as packed chunks;
2. ``init="least_squares"``: fit every translator by ridge regression onto the last residual
   state from the first ``init_tokens`` tokens (:mod:`depthlens.training.closed_form`);
3. KL steps until the budget (tokens or wall-clock minutes) is spent: one model forward per batch,
   then a per-layer forward/backward of the lens (:mod:`depthlens.training.objective`), an optimizer step
   and a linearly decaying learning rate;
4. save the lens; checkpoint every ``checkpoint_minutes`` of training time and at the end, so that
   ``resume=True`` continues exactly.

The training documents come in a seeded random order (a fresh one every epoch), so the
least-squares start and the first steps see many plays or documents, not the first few in file
order. The terminal shows the two phases (:mod:`depthlens.training.progress`).

The run folder (``runs/<model>``, ``runs/<model>/mid`` for ``site="mid"``, or ``out``) is laid out
by :mod:`depthlens.training.runs`: ``lens/``, ``checkpoint/`` (and ``eval/``, which the command line
writes after training).

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
from typing import Any

import torch
from tqdm.auto import tqdm

from depthlens.atomic import check_output
from depthlens.errors import TrainingError
from depthlens.lenses.mid import lens_class, site_of
from depthlens.lenses.tuned import TunedLens
from depthlens.model.hidden_states import Site, capture
from depthlens.model.load import load_model
from depthlens.model.precision import computing_in, resolve_dtype
from depthlens.paths import portable
from depthlens.text.data import TextSource, token_chunks, token_shares
from depthlens.training.checkpoint import load_checkpoint, save_checkpoint
from depthlens.training.closed_form import LeastSquares
from depthlens.training.config import DEFAULT_LR, TrainConfig
from depthlens.training.objective import Shortlist, accumulate_gradients
from depthlens.training.optim import make_optimizers
from depthlens.training.processes import Processes, is_first_process
from depthlens.training.progress import Smoothed, plan, show_step, steps_bar
from depthlens.training.runs import checkpoint_dir, lens_dir, run_dir

__all__ = ["DEFAULT_LR", "TrainConfig", "TrainResult", "TrainingError", "is_first_process", "make_optimizers", "run_dir", "train",
           "train_lens", "train_step"]


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


def _batches(source: TextSource, tokenizer: Any, config: TrainConfig, skip: int) -> Iterator[torch.Tensor]:
    """Chunks of the training split, repeated epoch after epoch, starting after ``skip`` chunks."""
    def forever() -> Iterator[torch.Tensor]:
        for epoch in itertools.count():
            yield from token_chunks(source, tokenizer, config.chunk_len, split="train", shuffle_seed=config.seed + epoch)

    return itertools.islice(forever(), skip, None)


def _check_data(source: TextSource, tokenizer: Any, config: TrainConfig) -> None:
    """Fail before any work if the budget needs more chunks than the training split has (a time
    budget, or ``repeat_data``, needs the initialisation and one batch; later batches repeat the data)."""
    repeats = config.tokens is None or config.repeat_data
    needed = (config.init_tokens if config.init == "least_squares" else 0) + (
        config.batch_tokens if repeats else config.tokens)
    needed_chunks = math.ceil(needed / config.chunk_len)
    available = sum(1 for _ in token_chunks(source, tokenizer, config.chunk_len, split="train", max_chunks=needed_chunks))
    if available < needed_chunks:
        raise TrainingError(
            f"the budget needs {needed} training tokens ({needed_chunks} chunks of {config.chunk_len}) but "
            f"{source} has only {available * config.chunk_len} in its train split; lower --tokens, use more text, "
            "or pass --repeat-data to read it more than once"
        )


def _least_squares_start(
    lens: TunedLens, model: torch.nn.Module, batches: Iterator[torch.Tensor], config: TrainConfig, procs: Processes,
    started: float, products: torch.dtype,
) -> int:
    """Fit every translator in closed form on ``init_tokens`` tokens, or on those read before
    ``init_share`` of a time budget (counted from ``started``) is spent, whichever comes first;
    returns the number of chunks consumed (all ranks). Products in ``products``; float64 sums on the lens's device."""
    device = lens.translators[0].weight.device
    stats = LeastSquares(lens.num_layers, lens.parts.d_model, device)
    per_rank = config.batch_tokens // config.chunk_len
    total_chunks = config.init_tokens // config.chunk_len
    deadline = started + config.init_share * config.minutes * 60 if config.minutes is not None else math.inf
    consumed = 0
    with tqdm(total=config.init_tokens, desc="phase 1/2 · least-squares start", unit="tok", disable=procs.rank != 0) as bar:
        while consumed < total_chunks and not (consumed and procs.from_first(float(time.monotonic() > deadline))):
            group = list(itertools.islice(batches, min(per_rank * procs.world, total_chunks - consumed)))
            consumed += len(group)
            mine = group[procs.rank :: procs.world]
            if mine:
                with computing_in(lens.parts.forward_dtype(products), device):
                    states = capture(model, torch.stack(mine).to(device), parts=lens.parts, site=site_of(lens)).states
                stats.update(states)
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
    check_output(config.run_path, "folder")
    job = _start(config, loaded, on_step, resume)
    if job.procs.rank == 0:
        tqdm.write(plan(config, job.progress))
    if config.init == "least_squares" and not job.progress["initialised"]:
        job.progress["chunks"] += _least_squares_start(job.lens, job.model, job.batches, config, job.procs, job.started,
                                                       job.products)
        job.progress["init_tokens_used"] = job.progress["chunks"] * config.chunk_len
        job.progress["initialised"] = True
    job.progress["seconds"] = time.monotonic() - job.started
    job.started += _call(on_step, job.lens, job.progress)
    _kl_steps(job)
    return _finish(job)


def train_lens(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str | os.PathLike,
    tokens: int,
    *,
    site: Site = "block",
    out: str | os.PathLike | None = None,
    **options: Any,
) -> TrainResult:
    """Train a lens of ``model`` (already in memory, with its ``tokenizer``) at ``site`` by the
    default recipe, on the training split of the text source ``data`` (``"mixed"``,
    ``"shakespeare"``, a file…), for a budget of ``tokens`` KL-step tokens after the
    least-squares start's ``init_tokens``: no wall clock, so a run gives the same lens on any
    machine. ``site="mid"`` trains a :class:`~depthlens.lenses.mid.MidTunedLens`.

    The lens is saved to ``<out>/lens`` (default: :attr:`TrainConfig.run_path` of the model's
    name); ``options`` are other :class:`TrainConfig` fields (``init_tokens``, ``seed``,
    ``dtype``…). Returns the :class:`TrainResult`."""
    name = getattr(model.config, "name_or_path", None) or TrainConfig.model
    return train(loaded=(model, tokenizer), **{"model": name, **options, "site": site, "data": os.fspath(data),
                                               "tokens": tokens, "minutes": None,
                                               "out": None if out is None else os.fspath(out)})


@dataclass
class _Job:
    """A training run under way: what it trains, with what, and how far it got.

    ``started`` is the ``time.monotonic()`` the budget counts from; it moves forward by the time
    spent in ``on_step`` so that callbacks are not charged.
    """

    config: TrainConfig
    procs: Processes
    model: torch.nn.Module
    tokenizer: Any
    lens: TunedLens
    optimizers: list[torch.optim.Optimizer]
    progress: dict[str, Any]
    batches: Iterator[torch.Tensor]
    on_step: Callable[[TunedLens, dict[str, Any]], None] | None
    started: float
    products: torch.dtype = torch.float32  # config.dtype resolved on this machine
    smoothed: Smoothed | None = None

    @property
    def run(self) -> Path:
        return self.config.run_path


_ADDED_LATER = {"site": "block", "repeat_data": False}
"""Settings younger than some checkpoints, with the value those checkpoints' runs had."""


def _start(
    config: TrainConfig,
    loaded: tuple[Any, Any] | None,
    on_step: Callable[[TunedLens, dict[str, Any]], None] | None,
    resume: bool,
) -> _Job:
    """Load the model and data, make the lens and optimizers, and restore the checkpoint if
    resuming; fails before any training if the data cannot cover the budget."""
    procs = Processes()
    torch.manual_seed(config.seed)
    model, tokenizer = loaded or load_model(config.model, device=procs.device)
    source = TextSource(config.data, column=config.column, group_column=config.group_column)
    _check_data(source, tokenizer, config)
    lens = lens_class(config.site)(model, training={"config": asdict(config)})
    optimizers = make_optimizers(lens, config)
    progress: dict[str, Any] = {"step": 0, "chunks": 0, "tokens": 0, "seconds": 0.0, "initialised": False, "history": []}
    if resume:
        checkpoint = checkpoint_dir(config.run_path)
        progress = load_checkpoint(checkpoint, lens, optimizers)
        saved = {**_ADDED_LATER, **progress.get("config", {})}
        if saved != asdict(config):
            raise TrainingError(f"the checkpoint in {checkpoint} belongs to a run with other settings; start without --resume")
    progress["config"] = asdict(config)
    batches = _batches(source, tokenizer, config, progress["chunks"])
    products = resolve_dtype(config.dtype, lens.translators[0].weight.device)
    return _Job(config, procs, model, tokenizer, lens, optimizers, progress, batches, on_step,
                started=time.monotonic() - progress["seconds"], products=products)


def _kl_steps(job: _Job) -> None:
    """Optimisation steps until the budget is spent, with a progress bar and checkpoints."""
    config, procs, progress = job.config, job.procs, job.progress
    per_rank_chunks = config.batch_tokens // config.chunk_len
    step_tokens = config.batch_tokens * procs.world
    bar = steps_bar(config, progress, disable=procs.rank != 0)
    job.smoothed = Smoothed()
    while True:
        done = procs.from_first(_budget_used(config, progress, step_tokens))
        if done >= 1.0:
            break
        group = list(itertools.islice(job.batches, per_rank_chunks * procs.world))
        batch = torch.stack(group[procs.rank * per_rank_chunks : (procs.rank + 1) * per_rank_chunks])
        warmup = min(1.0, (progress["step"] + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        losses = train_step(job.lens, job.model, batch, job.optimizers, config, procs=procs,
                            lr_factor=warmup * (1.0 - done), products=job.products)
        progress["step"] += 1
        progress["chunks"] += len(group)
        progress["tokens"] += step_tokens
        progress["seconds"] = time.monotonic() - job.started
        smoothed = job.smoothed.add(losses.mean().item())
        progress["history"].append({"step": progress["step"], "tokens": progress["tokens"],
                                    "seconds": round(progress["seconds"], 3), "loss": losses.sum().item(),
                                    "mean_layer_smoothed": round(smoothed, 5)})
        show_step(bar, config, progress, smoothed)
        if progress["seconds"] - progress.get("checkpoint_seconds", 0.0) >= 60 * config.checkpoint_minutes:
            progress["checkpoint_seconds"] = progress["seconds"]
            _checkpoint(job.run, job.lens, job.optimizers, progress, procs)
        job.started += _call(job.on_step, job.lens, progress)
    bar.close()


def _finish(job: _Job) -> TrainResult:
    """Write the last checkpoint and the lens (process 0), and report what the run produced."""
    progress, procs = job.progress, job.procs
    progress["complete"] = True
    _checkpoint(job.run, job.lens, [], progress, procs)
    recorded = {**asdict(job.config), "out": portable(job.config.out) if job.config.out else None}
    job.lens.training_info = {"config": recorded, "steps": progress["step"], "tokens": progress["tokens"],
                              "seconds": round(progress["seconds"], 1), "processes": procs.world,
                              "products": str(job.products).removeprefix("torch."),
                              "sources": _shares(job)}
    saved = lens_dir(job.run)
    if procs.rank == 0:
        job.lens.save_pretrained(saved)
    procs.barrier()
    procs.close()
    return TrainResult(job.lens, saved, job.model, job.tokenizer, progress["step"], progress["tokens"],
                       progress["seconds"], progress["history"])


def _shares(job: _Job) -> dict[str, float]:
    """Each kind's (or the source's) share of the training tokens the run read, rounded to 4 places."""
    config = job.config
    source = TextSource(config.data, column=config.column, group_column=config.group_column)
    shares = token_shares(source, job.tokenizer, config.chunk_len, job.progress["chunks"], config.seed)
    return {name: round(share, 4) for name, share in shares.items()}


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


def train_step(
    lens: TunedLens,
    model: torch.nn.Module,
    batch: torch.Tensor,
    optimizers: list[torch.optim.Optimizer],
    config: TrainConfig,
    *,
    procs: Processes | None = None,
    lr_factor: float = 1.0,
    products: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One optimisation step on the token ids ``batch [chunks, chunk_len]``; returns the mean loss per
    layer ``[L]`` (nats per token, float64). The lens decoding runs with products in ``products``
    (:func:`~depthlens.model.precision.computing_in`), and so does the model's forward pass unless
    its family keeps that in float32 (:meth:`~depthlens.model.architecture.ModelParts.forward_dtype`);
    the targets, losses and gradients are float32. ``procs`` (default ``Processes()``) sums gradients across ``torchrun``
    workers; the learning rate is ``config``'s times ``lr_factor``."""
    procs = procs or Processes()
    device = lens.translators[0].weight.device
    with computing_in(lens.parts.forward_dtype(products), device):
        states = capture(model, batch.to(device), parts=lens.parts, site=site_of(lens))
    flat = [s.reshape(-1, s.shape[-1]) for s in states.states]
    if config.objective == "kl":
        target = states.logits.reshape(flat[0].shape[0], -1).float().log_softmax(-1)
    else:
        target = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], dim=1).reshape(-1).to(flat[0].device)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=False)
    tokens = torch.tensor(float((target != -100).sum() if config.objective == "ce" else target.shape[0]))
    procs.sum_(tokens)
    with computing_in(products, device):
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
            f"{checkpoint_dir(config.run_path)}. Lower the learning rate (--lr) and run again with --resume"
        )
    if config.clip is not None:
        torch.nn.utils.clip_grad_norm_(lens.parameters(), config.clip)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * lr_factor * group["layer_scale"]
        optimizer.step()
    return losses


def _checkpoint(run: Path, lens: TunedLens, optimizers: list[torch.optim.Optimizer], progress: dict[str, Any], procs: Processes) -> None:
    if procs.rank == 0:
        save_checkpoint(checkpoint_dir(run), lens, optimizers, progress)
    procs.barrier()
