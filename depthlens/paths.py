"""Where depthlens keeps what it makes, relative to the current directory (the repository root)."""

from __future__ import annotations

from pathlib import Path

from depthlens.model import DEFAULT_MODEL

DEFAULT_LENS_DIR = Path("runs") / DEFAULT_MODEL / "lens"
"""The tuned lens trained for the default model by the main training job."""


def default_lens(model_spec: str) -> str:
    """The lens to use when none is named: :data:`DEFAULT_LENS_DIR` for the default model when
    that directory exists, else ``"logit"``."""
    if model_spec == DEFAULT_MODEL and DEFAULT_LENS_DIR.is_dir():
        return str(DEFAULT_LENS_DIR)
    return "logit"
