"""Lenses on the Hugging Face Hub: the ``hf:`` spec, its download, and the upload of a lens folder.

A hub spec names a repository, optionally a folder or file in it and a revision::

    hf:[spaces/|datasets/|models/]OWNER/NAME[/SUBFOLDER][@REVISION]

e.g. ``hf:spaces/AlignmentResearch/tuned-lens/lens/gpt2`` (the tuned-lens Space keeps a lens per
model in ``lens/<model id>``) or ``hf:me/lenses/smollm2-135m@v1``. The revision (a branch, tag or
commit) follows the last ``@``; a subfolder containing ``@`` cannot be named. The ``hf:`` prefix
is required: a bare ``owner/name`` reads exactly like a relative folder (``runs/x``), so guessing
would send a mistyped local path to the network, and a folder deleted by accident would turn
into a download. :func:`depthlens.lenses.registry.locate` tries a local path first, so an
existing folder literally named ``hf:…`` still wins.

:func:`download` fetches only that subfolder with ``huggingface_hub.snapshot_download`` into
huggingface_hub's own cache (``HF_HOME``, ``HF_HUB_CACHE``), returning the local path, which the
registry then sends through its kind detection. Offline (``HF_HUB_OFFLINE=1``) a cached copy is
used; without one, and on a connection error, it fails with one line naming offline mode and the
fix. :func:`upload` sends a staged folder (the lens plus its model card from
:mod:`depthlens.apps.hub_push`) with one ``HfApi().upload_folder`` call.

``huggingface_hub`` is imported inside the functions that need it, so parsing a spec stays cheap.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from depthlens.errors import LensFileError

HUB_PREFIX = "hf:"
"""What every hub spec starts with."""
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
"""The optional first part of a hub spec, and the ``repo_type`` it means."""
GRAMMAR = "hf:[spaces/|datasets/]OWNER/NAME[/SUBFOLDER][@REVISION]"
"""The hub spec grammar, as error messages show it."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class HubSpec:
    """A parsed hub spec: repository ``repo_id`` (``owner/name``) of type ``repo_type``
    (``model``, ``dataset`` or ``space``), the ``subfolder`` inside it (``""`` for the root) and
    the ``revision`` (``None`` for the default branch)."""

    repo_id: str
    repo_type: str = "model"
    subfolder: str = ""
    revision: str | None = None

    @property
    def _typed_id(self) -> str:
        """``owner/name``, after ``spaces/`` or ``datasets/`` for those types."""
        kind = next(prefix for prefix, name in REPO_TYPES.items() if name == self.repo_type)
        return ("" if self.repo_type == "model" else f"{kind}/") + self.repo_id

    def __str__(self) -> str:
        text = HUB_PREFIX + self._typed_id
        return text + (f"/{self.subfolder}" if self.subfolder else "") + (f"@{self.revision}" if self.revision else "")

    @property
    def url(self) -> str:
        """The repository's page on the hub (at the subfolder, when there is one)."""
        where = f"/tree/{self.revision or 'main'}/{self.subfolder}" if self.subfolder else ""
        return f"https://huggingface.co/{self._typed_id}{where}"


def is_hub_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` is written as a hub spec (starts with ``hf:``; a :class:`~pathlib.Path` made
    of one counts too)."""
    return os.fspath(spec).startswith(HUB_PREFIX)


def parse_hub_spec(spec: str, *, prefix_optional: bool = False) -> HubSpec:
    """Parse ``spec`` (:data:`GRAMMAR`; without ``hf:`` too when ``prefix_optional``).

    A revision with ``/`` in it (``refs/pr/3``) may be written as is, after the last ``@``. Slashes
    after ``hf:`` are skipped (``hf://`` is the URL form, and a :class:`~pathlib.Path` of it keeps one).
    Raises :class:`LensFileError` naming the grammar for a spec that does not fit it.
    """
    text = spec.removeprefix(HUB_PREFIX).lstrip("/")
    if not prefix_optional and not spec.startswith(HUB_PREFIX):
        raise LensFileError(f"{spec!r} is not a hub spec: write {GRAMMAR}")
    body, at, revision = text.rpartition("@") if "@" in text else (text, "", "")
    parts = body.split("/")
    repo_type = REPO_TYPES.get(parts[0], "model")
    if parts[0] in REPO_TYPES:
        parts = parts[1:]
    bad = (len(parts) < 2 or not all(_NAME.match(part) for part in parts[:2])
           or any(p in ("", ".", "..") for p in parts)
           or (at and not revision) or ".." in parts[1] or "--" in parts[1] or len(parts[1]) > 96)
    if bad:
        raise LensFileError(f"{spec!r} is not a Hugging Face Hub lens spec: write {GRAMMAR}, e.g. "
                            "hf:spaces/AlignmentResearch/tuned-lens/lens/gpt2")
    return HubSpec("/".join(parts[:2]), repo_type, "/".join(parts[2:]), unquote(revision) if at else None)


def hub_offline() -> bool:
    """Whether huggingface_hub's offline mode is on (``HF_HUB_OFFLINE``, read now, not at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def offline_fix(spec: HubSpec) -> str:
    """How to get the lens ``spec`` names onto a machine without the hub."""
    kind = "" if spec.repo_type == "model" else f" --repo-type {spec.repo_type}"
    include = f" --include '{spec.subfolder}/*'" if spec.subfolder else ""
    revision = f" --revision {spec.revision}" if spec.revision else ""
    where = f"DIR/{spec.subfolder}" if spec.subfolder else "DIR"
    return (f"where you are online, run hf download {spec.repo_id}{kind}{include}{revision} --local-dir DIR "
            f"and pass --lens {where}")


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed connection raises through huggingface_hub (httpx's and the builtin ones)."""
    import httpx

    return ConnectionError, TimeoutError, httpx.TransportError


_FETCHED: dict[HubSpec, Path] = {}
"""Specs already downloaded by this process, so a spec checked before the model loads is not
looked up on the hub again when it is loaded."""


def download(spec: HubSpec) -> Path:
    """The local path of the folder (or file) ``spec`` names, downloaded into huggingface_hub's
    cache if it is not there yet (only that subfolder).

    Raises :class:`LensFileError` in one line for offline mode or no connection without a cached
    copy (naming :func:`offline_fix`), a repository, revision or subfolder that does not exist, or a
    repository that is gated or refuses access.
    """
    if spec in _FETCHED:
        return _FETCHED[spec]
    import huggingface_hub
    from huggingface_hub import errors

    offline = hub_offline()
    patterns = [spec.subfolder, f"{spec.subfolder}/*"] if spec.subfolder else None
    try:
        root = huggingface_hub.snapshot_download(spec.repo_id, repo_type=spec.repo_type, revision=spec.revision,
                                                 allow_patterns=patterns, local_files_only=offline,
                                                 library_name="depthlens")
    except errors.GatedRepoError:
        raise LensFileError(f"{spec.url} is gated: accept its terms on that page and log in (hf auth login)") from None
    except errors.RepositoryNotFoundError:
        raise LensFileError(f"there is no {spec.repo_type} repository {spec.repo_id!r} on the Hugging Face Hub (or it "
                            f"is private): check the name, write spaces/ or datasets/ before it for those, and log "
                            "in (hf auth login) for a private one") from None
    except errors.RevisionNotFoundError:
        raise LensFileError(f"{spec.repo_id} has no revision {spec.revision!r}: name an existing branch, tag or "
                            "commit after @") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, *_network_errors()):
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the hub cannot be reached (no connection)"
        raise LensFileError(f"cannot download the lens {spec}: {why} and huggingface_hub's cache has no copy; "
                            f"{offline_fix(spec)}") from None
    except errors.HfHubHTTPError as error:
        raise LensFileError(f"the Hugging Face Hub refused {spec}: {str(error).splitlines()[0]}") from None
    path = Path(root) / spec.subfolder if spec.subfolder else Path(root)
    if not path.exists():
        raise LensFileError(f"{spec.repo_id} has no {spec.subfolder!r} at revision {spec.revision or 'main'}: check "
                            f"the path on {HubSpec(spec.repo_id, spec.repo_type, revision=spec.revision).url} (the "
                            "tuned-lens Space keeps its lenses in lens/<model id>)")
    _FETCHED[spec] = path
    return path


def upload(folder: Path, target: HubSpec, *, private: bool = False, message: str | None = None) -> str:
    """Upload every file of ``folder`` into ``target`` (its subfolder, on its revision as a branch,
    made from the default branch if missing), creating the repository if needed; returns the URL
    of the commit.

    Raises :class:`LensFileError` in one line for offline mode, no connection, no login or a
    refusal by the hub.
    """
    from huggingface_hub import HfApi, errors

    if hub_offline():
        raise LensFileError(f"cannot push to {target}: offline mode is on (HF_HUB_OFFLINE=1); unset it where the hub "
                            "can be reached")
    api = HfApi(library_name="depthlens")
    try:
        api.create_repo(target.repo_id, repo_type=target.repo_type, private=private, exist_ok=True)
        if target.revision:
            api.create_branch(target.repo_id, repo_type=target.repo_type, branch=target.revision, exist_ok=True)
        commit = api.upload_folder(repo_id=target.repo_id, folder_path=folder, path_in_repo=target.subfolder or None,
                                   repo_type=target.repo_type, revision=target.revision,
                                   commit_message=message or f"Upload lens with depthlens push to {target}")
    except errors.LocalTokenNotFoundError:
        raise LensFileError("pushing needs a Hugging Face login: run hf auth login or set HF_TOKEN") from None
    except errors.HfHubHTTPError as error:
        raise LensFileError(f"the Hugging Face Hub refused the push to {target}: {str(error).splitlines()[0]} (log in "
                            "with hf auth login as a user who may write there)") from None
    except (errors.OfflineModeIsEnabled, *_network_errors()) as error:
        raise LensFileError(f"cannot push to {target}: the hub cannot be reached ({type(error).__name__}); try again "
                            "where you are online") from None
    return str(getattr(commit, "commit_url", commit))


__all__ = ["GRAMMAR", "HUB_PREFIX", "REPO_TYPES", "HubSpec", "download", "hub_offline", "is_hub_spec",
           "offline_fix", "parse_hub_spec", "upload"]
