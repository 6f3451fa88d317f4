"""The tree passes ruff's checks with the settings in ``pyproject.toml`` (ruff is pinned in the
``test`` extra, since its default rules change between releases)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    """Planted bug: an unused import or an unsorted import block anywhere in the tree fails this."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
