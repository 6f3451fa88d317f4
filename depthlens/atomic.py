"""Atomic writes: a file or a whole directory appears complete or not at all.

Missing parent folders are made. A path that cannot be written (a file where a folder should
be, no permission, a read-only or full disk, a file name that names a folder) raises
:class:`~depthlens.errors.OutputError` naming the path and the fix; nothing is left behind.

Staging files and folders get the permissions an ordinary ``open`` or ``mkdir`` would give
(0666 or 0777 less the umask), not the private 0600/0700 of :mod:`tempfile`.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from depthlens.errors import OutputError

__all__ = ["check_output", "write_dir", "write_file"]


def _umasked(mode: int) -> int:
    """``mode`` less the process's umask (read by setting it and putting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return mode & ~umask


def _blocking_file(path: Path) -> Path | None:
    """The nearest ancestor of ``path`` that exists, if it is not a folder."""
    for ancestor in path.parents:
        if ancestor.exists():
            return None if ancestor.is_dir() else ancestor
    return None


def _output_error(path: Path, error: OSError, kind: str) -> OutputError:
    """One line naming ``path`` (a ``kind``: "file" or "folder"), the reason and the fix."""
    blocking = _blocking_file(path)
    fix = "choose another output path"
    if blocking is not None:
        reason = f"{blocking} is a file, not a folder"
    elif error.errno == errno.EISDIR or (kind == "file" and path.is_dir()):
        reason, fix = "a folder of that name exists", "give a file name"
    elif error.errno in (errno.EACCES, errno.EPERM):
        reason, fix = f"no permission to write in {path.parent}", "choose a folder you can write to"
    elif error.errno == errno.EROFS:
        reason = f"{path.parent} is on a read-only file system"
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason, fix = "the disk is full", "free some space or choose another disk"
    else:
        reason = error.strerror or str(error)
    return OutputError(f"cannot write the {kind} {path}: {reason}; {fix}")


def check_output(path: str | os.PathLike, kind: str = "file") -> Path:
    """Raise :class:`OutputError` now if ``path`` (a ``"file"`` or ``"folder"``) clearly cannot be
    written later: a file stands where a folder should be, a file would replace a folder, or the
    folder it would be written in (the nearest existing one) does not take a new file, which is
    tried with an empty temporary file, removed at once (permissions alone miss a read-only file
    system, or ``/proc``, where even root cannot write). Writing can still fail (a full disk);
    this only lets a command refuse before its work rather than after it."""
    target = Path(path)
    blocking = _blocking_file(target)
    if blocking is not None:
        raise _output_error(target, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), kind)
    if kind == "file" and target.is_dir():
        raise _output_error(target, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)), kind)
    if kind == "folder" and target.exists() and not target.is_dir():
        raise OutputError(f"cannot write the folder {target}: a file of that name exists; choose another output path")
    inside = kind == "folder" and target.is_dir()
    existing = target if inside else next((folder for folder in target.parents if folder.exists()), Path.cwd())
    try:
        handle, trial = tempfile.mkstemp(prefix=".depthlens-check.", dir=existing)
    except OSError as error:
        raise _output_error(target, error, kind) from None
    os.close(handle)
    os.unlink(trial)
    return target


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Raises :class:`OutputError` if ``path`` cannot be written.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as error:
        raise _output_error(target, error, "file") from None
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(staging, _umasked(0o666))
        os.replace(staging, target)
    except BaseException as error:
        Path(staging).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _output_error(target, error, "file") from None
        raise
    return target


def write_dir(directory: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Replace ``directory`` by one holding exactly ``files`` (name → content).

    The files are written and synced in a staging folder beside the target, which then takes the
    target's place; an existing directory survives any failure before that swap. Raises
    :class:`OutputError` if ``directory`` cannot be written.
    """
    target = Path(directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as error:
        raise _output_error(target, error, "folder") from None
    try:
        os.chmod(staging, _umasked(0o777))
        for name, data in files.items():
            with open(staging / name, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        _swap(staging, target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise _output_error(target, error, "folder") from None
        raise
    return target


def _swap(staging: Path, target: Path) -> None:
    """Put the complete ``staging`` folder in ``target``'s place, retiring an existing one."""
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired)
    else:
        staging.rename(target)
