"""The settings of a training run (:class:`TrainConfig`) and their checks.

A config is stored in the lens's ``config.json`` and in every checkpoint; ``resume`` refuses a
checkpoint made with other settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from depthlens.errors import TrainingError
from depthlens.model.hidden_states import SITES, Site
from depthlens.model.load import DEFAULT_MODEL
from depthlens.model.precision import DTYPE_NAMES, DtypeName
from depthlens.training.objective import Objective
from depthlens.training.runs import run_dir

__all__ = ["DEFAULT_LR", "Init", "Optimizer", "TrainConfig"]

Optimizer = Literal["muon", "adam", "sgd"]
Init = Literal["least_squares", "identity"]

DEFAULT_LR: dict[str, float] = {"muon": 0.01, "adam": 0.01, "sgd": 1.0}
"""Peak learning rate of each optimizer when ``lr`` is not given."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the lens's ``config.json``)."""

    model: str = DEFAULT_MODEL
    data: str = "mixed"
    """Training text: the built-in ``mixed`` corpus of many kinds (:mod:`depthlens.text.corpus`),
    ``shakespeare``, ``python-docs``, a local file, folder or glob, or a ``datasets`` name."""
    column: str = "text"
    group_column: str | None = None
    """Field whose value groups documents on one side of the train/validation split (e.g. a book id);
    default: each document is its own group (the built-in corpus groups by play)."""
    out: str | None = None
    """Run directory (``lens/``, ``checkpoint/``, ``eval/`` go inside); default ``runs/<model>``,
    ``runs/<model>/mid`` for ``site="mid"``."""
    site: Site = "block"
    """Where the translators read: ``"block"``, the block outputs (a tuned lens), or ``"mid"``,
    the mid states ``resid.i + attn.i`` after each block's attention (a lens inside the blocks,
    :class:`~depthlens.lenses.mid.MidTunedLens`)."""
    objective: Objective = "kl"
    optimizer: Optimizer = "adam"
    init: Init = "least_squares"
    init_tokens: int = 16384
    """Tokens of the least-squares start (at most; see ``init_share``)."""
    init_share: float = 0.5
    """With a time budget, the least-squares start stops reading after this share of it, even short
    of ``init_tokens``, so that a slow or busy machine still leaves time for the KL steps."""
    ridge: float = 1e-4
    """Ridge penalty of the least-squares start, relative to the mean diagonal of each layer's Gram
    matrix ``XᵀX`` (so it does not depend on the scale of the states or the number of tokens)."""
    chunk_len: int = 256
    batch_tokens: int = 256
    shortlist: int = 8
    """Estimate the KL on a shortlist of the vocabulary: the final distribution's ``shortlist``
    most likely tokens at every position of a batch, plus ``negatives`` sampled ones
    (:class:`~depthlens.training.objective.Shortlist`); 0 computes the exact KL over the whole vocabulary."""
    negatives: int = 512
    tokens: int | None = None
    """Budget of KL-step tokens (all processes together); exclusive with ``minutes``."""
    repeat_data: bool = False
    """Let a token budget read the training split more than once (each pass in a new shuffled
    order); without it, a budget larger than the split is refused before any work."""
    minutes: float | None = 6.5
    """Budget of wall-clock minutes for initialisation plus KL steps."""
    lr: float | None = None
    """Peak learning rate; default :data:`DEFAULT_LR` of the optimizer (0.01 for Adam and Muon)."""
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float | None = 1.0
    warmup_steps: int = 10
    """Steps over which the learning rate rises linearly to its peak (then it decays linearly to 0)."""
    layer_lr_decay: float = 0.99
    """Layer ``l``'s learning rate is ``lr · (1 − layer_lr_decay · l / L)``."""
    checkpoint_minutes: float = 2.0
    """Wall-clock minutes between checkpoints (0: after every step); the end is always checkpointed."""
    seed: int = 0
    dtype: DtypeName = "float32"
    """Precision of the matrix products of the model's forward passes and of the lens decoding
    (:func:`~depthlens.model.precision.resolve_dtype`): ``"float32"``, ``"bfloat16"``, or
    ``"auto"`` (bfloat16 where its products are fast); losses, gradients, the optimizer and the
    least-squares sums stay float32 or float64."""

    @property
    def run_path(self) -> Path:
        """The run folder: ``out``, else ``runs/<model>`` (``runs/<model>/mid`` for ``site="mid"``)."""
        return run_dir(self.model, self.out, self.site)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def check(self) -> None:
        """Raise :class:`TrainingError` for settings that cannot work."""
        if (self.tokens is None) == (self.minutes is None):
            raise TrainingError("give exactly one budget: tokens or minutes")
        if self.tokens is not None and self.tokens < self.batch_tokens:
            raise TrainingError(f"the token budget ({self.tokens}) is smaller than one batch ({self.batch_tokens} tokens)")
        if self.minutes is not None and not self.minutes > 0:
            raise TrainingError(f"the time budget must be positive, got {self.minutes} minutes")
        if self.chunk_len < 2:
            raise TrainingError(f"chunk_len must be at least 2 tokens, got {self.chunk_len}")
        if self.batch_tokens < self.chunk_len:
            raise TrainingError(f"batch_tokens ({self.batch_tokens}) must be at least one chunk ({self.chunk_len} tokens)")
        if self.init == "least_squares" and self.init_tokens < self.chunk_len:
            raise TrainingError(f"the least-squares start needs init_tokens ≥ chunk_len ({self.chunk_len}), got "
                                f"{self.init_tokens}; raise init_tokens or use init identity")
        if self.batch_tokens % self.chunk_len or self.init_tokens % self.chunk_len:
            raise TrainingError(f"batch_tokens and init_tokens must be multiples of chunk_len ({self.chunk_len})")
        if self.optimizer not in DEFAULT_LR:
            raise TrainingError(f"unknown optimizer {self.optimizer!r}; use muon, adam or sgd")
        if not 0.0 <= self.layer_lr_decay < 1.0:
            raise TrainingError(f"layer_lr_decay must be in [0, 1), got {self.layer_lr_decay}")
        if self.shortlist < 0 or self.negatives < 0:
            raise TrainingError(f"--shortlist and --negatives must be ≥ 0, got {self.shortlist} and {self.negatives}")
        self._check_steps()
        if self.objective not in ("kl", "ce"):
            raise TrainingError(f"unknown objective {self.objective!r}; use kl or ce")
        if self.init not in ("least_squares", "identity"):
            raise TrainingError(f"unknown init {self.init!r}; use least_squares or identity")
        if self.site not in SITES:
            raise TrainingError(f"unknown site {self.site!r}; use {' or '.join(SITES)}")
        if self.dtype not in DTYPE_NAMES:
            raise TrainingError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPE_NAMES)}")

    def _check_steps(self) -> None:
        """Raise :class:`TrainingError` for step settings that cannot work."""
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0):
            raise TrainingError(f"the learning rate must be a number ≥ 0, got {self.lr}; pass another lr")
        if self.clip is not None and not self.clip > 0:
            raise TrainingError(f"gradient clipping must be positive, got {self.clip}; pass another clip")
        if not 0.0 < self.init_share <= 1.0:
            raise TrainingError(f"init_share must be in (0, 1], got {self.init_share}; pass another --init-share")
        if not self.ridge >= 0:
            raise TrainingError(f"the ridge penalty must be ≥ 0, got {self.ridge}; pass another ridge")
        if self.warmup_steps < 0:
            raise TrainingError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if not self.checkpoint_minutes >= 0:
            raise TrainingError(f"checkpoint_minutes must be ≥ 0, got {self.checkpoint_minutes}; pass another --checkpoint-minutes")
