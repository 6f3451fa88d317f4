"""Bad input sent to the command line, and what must come back.

A :class:`Probe` is one command line. ``expect="error"``: exit status 2 and exactly one line on
standard error, ``depthlens …: error: …``, that contains ``says`` (the problem, named), and no file
left under the probe's folder unless it was there before. ``expect="warning"``: exit status 0 and a
line on standard error with ``warning`` and ``says`` in it. A traceback fails either way.

Probes run in this process (:func:`depthlens.apps.cli.main`), so the tiny model loads once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from depthlens.apps.cli import main


@dataclass(frozen=True)
class Probe:
    """One bad command line and the message it must give."""

    argv: list[str]
    says: str
    """A fragment (case-insensitive) the error or warning line must contain."""
    expect: str = "error"
    """``"error"`` (exit 2, one line) or ``"warning"`` (exit 0, a stated warning)."""
    label: str = field(default="")

    def __str__(self) -> str:
        return self.label or " ".join(self.argv)


def run_probe(probe: Probe, capsys: pytest.CaptureFixture[str], watch: Path | None = None) -> None:
    """Run ``probe`` and assert what it must give; ``watch`` is a folder that an error must leave
    as it found it (no partial file)."""
    before = _listing(watch)
    try:
        status = main(probe.argv)
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 2
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err, err
    if probe.expect == "error":
        assert status == 2, f"exit {status} for {probe}: {err}"
        assert len(lines) == 1, f"{len(lines)} lines for {probe}: {err}"
        assert ": error: " in lines[0] and lines[0].startswith("depthlens"), lines[0]
        assert probe.says.lower() in lines[0].lower(), f"{probe.says!r} not in {lines[0]!r}"
        assert _listing(watch) == before, f"{probe} left files behind"
    else:
        assert status == 0, f"exit {status} for {probe}: {err}"
        warned = [line for line in lines if "warning" in line.lower() and probe.says.lower() in line.lower()]
        assert warned, f"no warning with {probe.says!r} for {probe}: {err}"


def _listing(folder: Path | None) -> list[str]:
    return [] if folder is None or not folder.exists() else sorted(str(p) for p in folder.rglob("*"))
