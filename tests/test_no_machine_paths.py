"""No committed file names a folder of the machine it was made on: results record paths relative
to the repository or the user's cache (``~/…``), or not at all (:func:`depthlens.paths.portable`)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from depthlens.paths import portable

ROOT = Path(__file__).resolve().parents[1]
_SEP = "/"
MACHINE_FOLDERS = re.compile(
    "|".join([
        rf"{_SEP}(?:root|tmp|scratch|work|mnt|private{_SEP}var|var{_SEP}folders){_SEP}",
        rf"{_SEP}(?:home|Users){_SEP}[A-Za-z0-9._-]+{_SEP}",
        r"[A-Za-z]:\\(?:Users|Temp)\\",
        re.escape(str(ROOT)),
    ])
)
"""An absolute path under a home, scratch or checkout folder (the checkout's own path included)."""
BINARY = {".png", ".jpg", ".gif", ".safetensors", ".pt", ".whl", ".gguf", ".ico"}


UNTRACKED_DIRS = {".git", "__pycache__", "runs", "build", "dist", ".pytest_cache"}
"""Folders that are never committed (``.gitignore``), skipped where this is not a git checkout."""


def _tracked_files() -> list[Path]:
    """The files git tracks, or, outside a git checkout (an unpacked copy), every file except
    those under virtual environments and the never-committed folders."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode == 0:
        return [ROOT / name for name in listed.stdout.split("\0") if name]
    return [path for path in ROOT.rglob("*") if path.is_file() and not any(
        part in UNTRACKED_DIRS or part.startswith(".venv") or part.endswith(".egg-info")
        for part in path.relative_to(ROOT).parts[:-1])]


def test_the_pattern_finds_machine_paths_and_spares_others():
    for found in ["/root/.cache/x", "/tmp/g3run", "/home/alice/lens", "/work/lens_run/a", "C:\\Users\\bob\\x",
                  "/Users/carol/x", str(ROOT / "runs")]:
        assert MACHINE_FOLDERS.search(f'"out": "{found}"'), found
    for spared in ["runs/smollm2-135m/lens", "~/.cache/depthlens/models", "/usr/bin/chromium", "https://x.org/tmp"]:
        assert not MACHINE_FOLDERS.search(spared), spared


def test_no_tracked_file_holds_a_machine_path():
    offenders = []
    for path in _tracked_files():
        if path.suffix in BINARY or not path.is_file() or path == Path(__file__).resolve():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_FOLDERS.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "absolute machine paths in committed files:\n" + "\n".join(offenders)


def test_portable_keeps_repository_and_cache_paths_and_drops_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert portable(ROOT / "benchmarks" / "results" / "x.json") == "benchmarks/results/x.json"
    assert portable(Path.home() / ".cache" / "depthlens") == "~/.cache/depthlens"
    assert portable(os.path.join(os.sep, "opt", "elsewhere")) is None
