"""Planted bugs in training: resuming, the objective and start, clipping, the data stream, the
budget, the optimisers, and the evaluation at the end of ``depthlens train``.
:mod:`planted_bugs` merges :data:`TRAINING_PLANTS` into its table; run one as::

    python benchmarks/planted_bugs.py objective_ce_ignored
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path


def _resume_from_scratch() -> None:
    """--resume checks the saved settings, then trains from scratch."""
    from depthlens.training import train

    def load(directory, module, optimizers):
        saved = json.loads((Path(directory) / "state.json").read_text())["progress"]
        return {"step": 0, "chunks": 0, "tokens": 0, "seconds": 0.0, "initialised": False, "history": [],
                "config": saved["config"]}

    train.load_checkpoint = load


def _objective_ignored() -> None:
    """--objective ce is accepted but the KL is trained."""
    from depthlens.training import train

    real = train.train_step

    def step(lens, model, batch, optimizers, config, *args, **kwargs):
        return real(lens, model, batch, optimizers, dataclasses.replace(config, objective="kl"), *args, **kwargs)

    train.train_step = step


def _init_identity_ignored() -> None:
    """--init identity is accepted, but the least-squares start runs anyway."""
    from depthlens.training.config import TrainConfig

    real = TrainConfig.check

    def check(self):
        real(self)
        if self.init == "identity":
            self.init = "least_squares"

    TrainConfig.check = check


def _no_clipping() -> None:
    """Gradients are never clipped."""
    import torch

    torch.nn.utils.clip_grad_norm_ = lambda parameters, max_norm, *args, **kwargs: torch.tensor(0.0)


def _data_does_not_repeat() -> None:
    """Training stops (with an error) when the training split runs out under a time budget."""
    import itertools

    from depthlens.text.data import token_chunks
    from depthlens.training import train

    def batches(source, tokenizer, config, skip):
        return itertools.islice(token_chunks(source, tokenizer, config.chunk_len, split="train"), skip, None)

    train._batches = batches


def _minutes_half() -> None:
    """A time budget stops at half the minutes."""
    from depthlens.training import train

    real = train._budget_used

    def used(config, progress, step_tokens):
        value = real(config, progress, step_tokens)
        return value if config.tokens is not None else 2 * value

    train._budget_used = used


def _muon_gets_everything() -> None:
    """--optimizer muon runs Adam on every parameter."""
    import torch

    from depthlens.training import optim

    real = optim.make_optimizers

    def make(lens, config):
        if config.optimizer != "muon":
            return real(lens, config)
        return [torch.optim.Adam(lens.parameters(), lr=config.learning_rate)]

    optim.make_optimizers = make
    from depthlens.training import train
    train.make_optimizers = make


def _no_final_eval() -> None:
    """depthlens train skips the evaluation at the end."""
    from depthlens.apps import cli

    real = cli._train

    def train(args):
        args.no_eval = True
        return real(args)

    cli._train = train


TRAINING_PLANTS: dict[str, tuple[Callable[[], None], list[str]]] = {
    "resume_from_scratch": (_resume_from_scratch, ["tests/test_mutations_training.py"]),
    "objective_ce_ignored": (_objective_ignored, ["tests/test_mutations_training.py"]),
    "init_identity_ignored": (_init_identity_ignored, ["tests/test_mutations_training.py"]),
    "no_gradient_clipping": (_no_clipping, ["tests/test_mutations_training.py"]),
    "data_does_not_repeat": (_data_does_not_repeat, ["tests/test_mutations_training.py"]),
    "minutes_budget_halved": (_minutes_half, ["tests/test_mutations_training.py"]),
    "muon_not_used": (_muon_gets_everything, ["tests/test_mutations_training.py"]),
    "train_skips_final_eval": (_no_final_eval, ["tests/test_mutations_training.py"]),
}
