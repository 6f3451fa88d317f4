"""What a training run shows on the terminal: its plan, the KL-step bar and a smoothed loss.

The least-squares start has its own bar in :mod:`depthlens.training.train`; the KL steps count
seconds of what is left of a time budget (or tokens of a token budget), with the step number and
a loss smoothed over about :data:`SMOOTHING_STEPS` steps.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from depthlens.training.config import TrainConfig
from depthlens.training.runs import checkpoint_dir

__all__ = ["SMOOTHING_STEPS", "Smoothed", "plan", "show_step", "steps_bar"]

SMOOTHING_STEPS = 20
"""Steps the loss shown during training is averaged over (the shortlist estimate of one batch is noisy)."""


class Smoothed:
    """An exponential moving average of the per-step loss over about :data:`SMOOTHING_STEPS` steps,
    bias-corrected so that the first steps are not pulled towards 0."""

    def __init__(self) -> None:
        self.average, self.weight = 0.0, 0.0

    def add(self, value: float) -> float:
        decay = 1.0 - 1.0 / SMOOTHING_STEPS
        self.average = decay * self.average + (1.0 - decay) * value
        self.weight = decay * self.weight + (1.0 - decay)
        return self.average / self.weight


def steps_bar(config: TrainConfig, progress: dict[str, Any], disable: bool) -> tqdm:
    """The KL-step phase's bar: tokens of a token budget, or the seconds left of a time budget
    when the steps begin (so it starts at 0, not where the least-squares start left the clock)."""
    name = "phase 2/2 · " + ("KL steps" if config.objective == "kl" else "cross-entropy steps")
    if config.tokens is not None:
        return tqdm(total=config.tokens, initial=progress["tokens"], desc=name, unit="tok", disable=disable)
    progress.setdefault("steps_began", progress["seconds"])
    total = max(1, round(config.minutes * 60 - progress["steps_began"]))
    return tqdm(total=total, initial=min(total, round(progress["seconds"] - progress["steps_began"])), desc=name,
                unit="s", disable=disable, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")


def show_step(bar: tqdm, config: TrainConfig, progress: dict[str, Any], smoothed: float) -> None:
    """Move the bar and show the step number and the smoothed per-layer loss (nats)."""
    if config.tokens is not None:
        bar.n = min(bar.total, progress["tokens"])
    else:
        bar.n = min(bar.total, round(progress["seconds"] - progress["steps_began"]))
    estimate = config.objective == "kl" and config.shortlist
    name = "KL/layer ≈" if estimate else ("KL/layer" if config.objective == "kl" else "CE/layer")
    bar.set_postfix_str(f"step {progress['step']}, {name} {smoothed:.3f} nats (avg of ~{SMOOTHING_STEPS} steps)",
                        refresh=False)
    bar.refresh()


def plan(config: TrainConfig, progress: dict[str, Any]) -> str:
    """One line saying what the run will do: where its translators read, its phases, its budget
    and where it checkpoints."""
    site = "translators inside the blocks (after attention, before the MLP); " if config.site == "mid" else ""
    share = f" (or {config.init_share:.0%} of the time, if that comes first)" if config.minutes is not None else ""
    start = (f"phase 1: least-squares start on {config.init_tokens} tokens{share}; " if config.init == "least_squares"
             else "identity start; ")
    budget = f"{config.tokens} tokens" if config.tokens is not None else f"{config.minutes:g} minutes in all (both phases)"
    every = "every step" if config.checkpoint_minutes == 0 else f"every {config.checkpoint_minutes:g} min"
    resumed = f"resuming at step {progress['step']}; " if progress["step"] or progress["initialised"] else ""
    return (f"{resumed}{site}{start}phase 2: {config.objective.upper()} steps of {config.batch_tokens} tokens until "
            f"{budget} are spent; checkpoints {every} and at the end, in {checkpoint_dir(config.run_path)}")
