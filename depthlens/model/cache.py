"""A cache of dequantized models: a GGUF file is dequantized once, later loads read safetensors.

Where: ``$DEPTHLENS_CACHE`` if set, else ``$XDG_CACHE_HOME/depthlens/models`` (default
``~/.cache/depthlens/models``). Bypass it with ``load_model(..., cache=False)`` or the environment
variable ``DEPTHLENS_NO_CACHE=1``.

What is cached: GGUF sources only (the built-in models and ``.gguf`` files), whose dequantization
takes tens of seconds. A local model directory already holds safetensors (or loads as fast as the
cache would), and a hub name is already cached by ``huggingface_hub``; copying either would only
spend disk.

Key: the sha256 of the GGUF file's content, the dtype, and the versions of depthlens, torch,
transformers and gguf. The file's hash is remembered in ``hashes.json`` by (path, size, mtime), so
an unchanged file is hashed once; a file rewritten in place with the same size and mtime would
not be noticed (``depthlens cache clear SPEC`` then).

Entry: a folder ``<gguf stem>.<dtype>.<key[:16]>`` holding what ``save_pretrained`` writes for the
model (``config.json``, ``generation_config.json``, ``model.safetensors``) and the tokenizer, plus
``depthlens-cache.json``: the key, source, dtype, versions, and the size and sha256 of every file.
It is written in a staging folder beside it and renamed into place, so it exists complete or not
at all; writing it removes older entries of the same source and dtype. A cache that cannot be
written (full disk, no permission) costs one warning, not the load.

A miss dequantizes the GGUF, writes the entry and reads the model back from it, so a miss and a
hit return the same model and tokenizer (equal weights and logits to the GGUF load itself).

Check: every hit compares the size and full sha256 of every file with the manifest (so damage is
found by checksum; ``sha256sum`` gives the same digests). Hashing runs at ~1.2 GB/s on one core
here (0.5 s for smollm2-135m's 0.5 GB, 0.9 s for gemma3-270m's 1.1 GB) in a thread beside the
load, which spends longer parsing the tokenizer, so on a machine with a free core it adds no
wall time. A mismatch prints one line to stderr and the entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

from depthlens._version import __version__
from depthlens.atomic import write_file
from depthlens.errors import DepthlensError, ModelCacheError, OutputError

CACHE_ENV = "DEPTHLENS_CACHE"
NO_CACHE_ENV = "DEPTHLENS_NO_CACHE"
MANIFEST = "depthlens-cache.json"
HASHES = "hashes.json"
FORMAT = 1
_STAGING_PREFIX = ".staging-"
_CHUNK = 8 * 2**20
_KEY_PACKAGES = ("torch", "transformers", "gguf")
_ENTRY_NAME = re.compile(r"[^.].*\.[a-z0-9]+\.[0-9a-f]{16}")
T = TypeVar("T")


@dataclass(frozen=True)
class CacheEntry:
    """One cached model: its folder, the spec and GGUF file it was made from, dtype, total bytes,
    creation time (ISO 8601, UTC), and whether its library versions are the running ones."""

    path: Path
    key: str
    spec: str
    source: str
    dtype: str
    size: int
    created: str
    current: bool


def user_cache(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/depthlens/<parts>`` (default ``~/.cache/depthlens/<parts>``): the one
    place depthlens keeps what it fetched or built (it may not exist yet)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().joinpath("depthlens", *parts)


def cache_root() -> Path:
    """The cache folder of dequantized models (it may not exist yet)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return user_cache("models")


def cache_enabled(cache: bool | None = None) -> bool:
    """Whether to use the cache: ``cache`` if given, else not when ``DEPTHLENS_NO_CACHE`` is set
    to anything but ``""``/``0``/``false``/``no``."""
    if cache is not None:
        return bool(cache)
    return os.environ.get(NO_CACHE_ENV, "").strip().lower() in ("", "0", "false", "no")


def versions() -> dict[str, str]:
    """The library versions that are part of every key."""
    found = {"depthlens": __version__}
    for package in _KEY_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "none"
    return found


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (what ``sha256sum`` prints), read in 8 MiB chunks into one
    buffer. Hashing and reading release the GIL, so this runs well in a thread."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while size := file.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def known_digest(path: Path, root: Path | None = None) -> str | None:
    """The sha256 remembered for ``path`` if its size and mtime are unchanged, else None (no hashing)."""
    path = path.resolve()
    stat = path.stat()
    known = _read_memo(root or cache_root()).get(str(path))
    if isinstance(known, dict) and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return str(known["sha256"])
    return None


def source_digest(path: Path, root: Path | None = None) -> str:
    """sha256 of ``path``'s content, remembered in ``hashes.json`` by (path, size, mtime)."""
    path = path.resolve()
    known = known_digest(path, root)
    if known is not None:
        return known
    stat = path.stat()
    digest = sha256_file(path)
    memo_path = (root or cache_root()) / HASHES
    memo = _read_memo(memo_path.parent)
    memo = {name: value for name, value in memo.items() if Path(name).exists()}
    memo[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        write_file(memo_path, json.dumps(memo, indent=1).encode())
    except (OSError, OutputError):
        pass  # only a speed-up; the next load hashes again
    return digest


def entry_key(digest: str, dtype: torch.dtype) -> str:
    """The key of a source with content hash ``digest`` loaded as ``dtype`` by these library versions."""
    parts = {"format": FORMAT, "source_sha256": digest, "dtype": _dtype_name(dtype), "versions": versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def entry_path(key: str, source: Path, dtype: torch.dtype, root: Path | None = None) -> Path:
    """The folder of an entry: ``<root>/<gguf stem>.<dtype>.<key[:16]>``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.stem)[:80] or "model"
    return (root or cache_root()) / f"{stem}.{_dtype_name(dtype)}.{key[:16]}"


def verify(entry: Path, key: str) -> None:
    """Raise :class:`ModelCacheError` unless ``entry`` has a manifest for ``key`` and every file it
    lists has the recorded size and sha256."""
    manifest = read_manifest(entry)
    if not isinstance(manifest.get("files"), dict):
        raise ModelCacheError("its manifest is missing or unreadable")
    if manifest.get("key") != key:
        raise ModelCacheError("its manifest is for another key")
    for name, expected in manifest["files"].items():
        path = entry / name
        if not path.is_file():
            raise ModelCacheError(f"{name} is missing")
        if path.stat().st_size != expected.get("size"):
            raise ModelCacheError(f"{name} has the wrong size")
        if sha256_file(path) != expected.get("sha256"):
            raise ModelCacheError(f"{name} fails its checksum")


def report_damaged(entry: Path, reason: str) -> None:
    """Print the one-line notice and remove the entry."""
    print(f"depthlens: cache entry {entry} is damaged ({reason}); rebuilding", file=sys.stderr)
    remove(entry)


def read(entry: Path, key: str, loader: Callable[[Path], T]) -> T | None:
    """``loader(entry)`` if the entry exists and passes :func:`verify`; None on a miss.

    The check runs in a thread beside ``loader`` (hashing releases the GIL, and parsing a large
    tokenizer holds it), and what ``loader`` returned is dropped if the check fails. A damaged
    entry, or one that ``loader`` cannot read (``OSError``, :class:`DepthlensError`), is reported,
    removed, and counts as a miss."""
    if not entry.exists():
        return None
    with ThreadPoolExecutor(max_workers=1) as pool:
        check = pool.submit(verify, entry, key)
        try:
            result, failure = loader(entry), None
        except Exception as error:  # noqa: BLE001 - a damaged file fails anyhow; re-raised if sound
            result, failure = None, error
        try:
            check.result()
        except (ModelCacheError, OSError) as error:
            report_damaged(entry, str(error))
            return None
    if isinstance(failure, (OSError, DepthlensError)):
        report_damaged(entry, str(failure).splitlines()[0] if str(failure) else type(failure).__name__)
        return None
    if failure is not None:
        raise failure
    return result


def store(entry: Path, key: str, write: Callable[[Path], None], info: dict[str, Any]) -> Path | None:
    """Make the entry ``entry`` for ``key`` from what ``write(folder)`` puts in a staging folder,
    atomically: the files' sizes and sha256 go into the manifest with ``info`` (spec, source,
    dtype, ...), then the folder is renamed into place.

    Returns the entry, or None when it cannot be written (a warning is printed; the cache is only
    a speed-up). Other entries made from the same source and dtype (older library versions) are
    removed."""
    root = entry.parent
    staging: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_old_staging(root)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
        write(staging)
        files = {
            path.name: {"size": path.stat().st_size, "sha256": _sync_and_hash(path)}
            for path in sorted(staging.iterdir())
            if path.is_file()
        }
        manifest = {"format": FORMAT, "key": key, **info, "versions": versions(),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}
        write_file(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
        os.chmod(staging, 0o777 & ~_umask())
        if entry.exists():
            remove(entry)
        try:
            staging.rename(entry)
        except OSError:
            if not (entry / MANIFEST).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process stored it first
        staging = None
    except Exception as error:  # noqa: BLE001 - the cache is a speed-up: failing to write it costs a warning
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"depthlens: cannot write the model cache in {root} ({error}); loading without it", file=sys.stderr)
        return None
    for other in list_entries(root):
        if other.path != entry and other.source == info.get("source") and other.dtype == info.get("dtype"):
            remove(other.path)
    return entry


def read_manifest(entry: Path) -> dict[str, Any]:
    """The manifest of an entry ({} if it has none that can be read)."""
    manifest = _read_json(entry / MANIFEST)
    return manifest if isinstance(manifest, dict) else {}


def list_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry in the cache folder, oldest first."""
    root = root or cache_root()
    if not root.is_dir():
        return []
    now = versions()
    entries = []
    for path in sorted(root.iterdir()):
        manifest = _read_json(path / MANIFEST) if path.is_dir() else None
        if not isinstance(manifest, dict) or path.name.startswith(_STAGING_PREFIX):
            continue
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        entries.append(CacheEntry(
            path=path, key=str(manifest.get("key", "")), spec=str(manifest.get("spec", "")),
            source=str(manifest.get("source", "")), dtype=str(manifest.get("dtype", "")), size=size,
            created=str(manifest.get("created", "")), current=manifest.get("versions") == now,
        ))
    return sorted(entries, key=lambda e: e.created)


def clear(
    spec: str | os.PathLike | None = None, root: Path | None = None, *, sources: Iterable[Path] = ()
) -> list[CacheEntry]:
    """Remove the entries made from ``spec`` (as it was given to ``load_model``, or a GGUF path;
    ``sources`` adds the files it stands for, any dtype and version), or every entry and the hash
    memo when ``spec`` is None. Returns what was removed. For built-in names use
    :func:`depthlens.model.load.clear_cache`, which resolves them."""
    root = root or cache_root()
    entries = list_entries(root)
    if spec is not None:
        names = {os.fspath(spec)} | {str(p) for p in (*_source_paths(os.fspath(spec)), *sources)}
        entries = [e for e in entries if e.spec in names or e.source in names]
    for entry in entries:
        remove(entry.path)
    if spec is None and root.is_dir():
        for path in root.iterdir():  # entries too damaged to list
            if path.is_dir() and _ENTRY_NAME.fullmatch(path.name):
                remove(path)
        (root / HASHES).unlink(missing_ok=True)
        _remove_old_staging(root, age_s=0)
    return entries


def remove(path: Path) -> None:
    """Remove an entry folder: renamed aside first, so a half-deleted entry is never seen."""
    if not path.exists():
        return
    retired = path.with_name(f"{_STAGING_PREFIX}removed-{os.getpid()}-{path.name}")
    try:
        path.rename(retired)
    except OSError:
        retired = path
    shutil.rmtree(retired, ignore_errors=True)


def _source_paths(spec: str) -> list[Path]:
    """The GGUF file a path spec names, if it exists (built-in names are resolved by the loader)."""
    path = Path(spec).expanduser()
    try:
        return [path.resolve()] if path.is_file() else []
    except OSError:
        return []


def _remove_old_staging(root: Path, age_s: float = 3600) -> None:
    """Remove staging folders that a crashed or killed process left behind."""
    for path in root.glob(f"{_STAGING_PREFIX}*"):
        try:
            if time.time() - path.stat().st_mtime > age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _sync_and_hash(path: Path) -> str:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())
    return sha256_file(path)


def _read_memo(root: Path) -> dict[str, Any]:
    memo = _read_json(root / HASHES)
    return memo if isinstance(memo, dict) else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
