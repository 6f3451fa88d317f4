"""Paths as results record them: never an absolute path of the machine a result was made on.

A path inside the working folder (the repository, for the benchmarks and docs) is written
relative to it, one under the home folder as ``~/…`` (the user's cache); any other path is not
recorded at all.
"""

from __future__ import annotations

import os
from pathlib import Path


def portable(path: str | os.PathLike) -> str | None:
    """``path`` relative to the working folder, else as ``~/…`` under the home folder, else
    ``None``: what a result file may record of where something lies."""
    resolved = Path(path).expanduser().resolve()
    for base, prefix in ((Path.cwd().resolve(), ""), (Path.home().resolve(), "~/")):
        if resolved == base or base in resolved.parents:
            return prefix + (resolved.relative_to(base).as_posix() if resolved != base else ".")
    return None


__all__ = ["portable"]
