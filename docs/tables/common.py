"""What every table module shares: reading a result file and writing markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


def load(path: str) -> Any:
    """A result file, by its path from the repository root."""
    return json.loads((ROOT / path).read_text(encoding="utf-8"))


def interval(value: float, low: float, high: float, digits: int = 3) -> str:
    """``value [low, high]`` with ``digits`` decimals."""
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def outcome(holds: bool, against: bool) -> str:
    """A claim's verdict on one model: ``reproduced`` where the intervals are all on the claimed
    side, ``refuted`` where they are on the other side, else ``differs``."""
    return "reproduced" if holds else ("refuted" if against else "differs")


def verdict(outcomes: dict[str, str]) -> str:
    """One verdict for the claim: the models' outcome when they agree, else each model's."""
    if len(set(outcomes.values())) == 1:
        return next(iter(outcomes.values()))
    return "; ".join(f"{model}: {result}" for model, result in outcomes.items())


def layers_text(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if layers else "none"
