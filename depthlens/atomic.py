"""Atomic writes: a file or a whole directory appears complete or not at all.

Staging files and folders get the permissions an ordinary ``open`` or ``mkdir`` would give
(0666 or 0777 less the umask), not the private 0600/0700 of :mod:`tempfile`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _umasked(mode: int) -> int:
    """``mode`` less the process's umask (read by setting it and putting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return mode & ~umask


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(staging, _umasked(0o666))
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target


def write_dir(directory: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Replace ``directory`` by one holding exactly ``files`` (name → content).

    The files are written and synced in a staging folder beside the target, which then takes the
    target's place; an existing directory survives any failure before that swap.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(staging, _umasked(0o777))
        for name, data in files.items():
            with open(staging / name, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
