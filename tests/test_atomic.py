"""Atomic writes: complete files and folders or none, missing folders made, and one clear
OutputError (path, reason, fix) for a path that cannot be written."""

import os
import stat

import pytest

from depthlens.atomic import check_output, write_dir, write_file
from depthlens.errors import OutputError


def test_write_file_makes_missing_folders_and_ordinary_permissions(tmp_path):
    target = write_file(tmp_path / "new" / "deeper" / "a.txt", b"hello")
    assert target.read_bytes() == b"hello"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    write_file(target, b"again")
    assert target.read_bytes() == b"again" and os.listdir(target.parent) == ["a.txt"]


def test_write_dir_replaces_the_whole_folder(tmp_path):
    write_dir(tmp_path / "run" / "lens", {"a": b"1", "b": b"2"})
    write_dir(tmp_path / "run" / "lens", {"c": b"3"})
    assert sorted(os.listdir(tmp_path / "run" / "lens")) == ["c"]
    assert os.listdir(tmp_path / "run") == ["lens"]


@pytest.mark.parametrize("inside", ["blocker.txt/out.png", "blocker.txt/a/b/out.png"])
def test_a_file_in_the_way_is_one_clear_error(tmp_path, inside):
    (tmp_path / "blocker.txt").write_text("x")
    for write in (lambda p: write_file(p, b"data"), lambda p: write_dir(p, {"f": b"data"})):
        with pytest.raises(OutputError) as caught:
            write(tmp_path / inside)
        message = str(caught.value)
        assert str(tmp_path / inside) in message and "blocker.txt is a file, not a folder" in message
        assert "choose another output path" in message and "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["blocker.txt"] and (tmp_path / "blocker.txt").read_text() == "x"


def test_a_folder_where_the_file_should_go_is_one_clear_error(tmp_path):
    (tmp_path / "table.csv").mkdir()
    with pytest.raises(OutputError, match="a folder of that name exists; give a file name"):
        write_file(tmp_path / "table.csv", b"data")
    assert os.listdir(tmp_path) == ["table.csv"] and os.listdir(tmp_path / "table.csv") == []


def test_check_output_refuses_before_any_work_and_writes_nothing(tmp_path):
    (tmp_path / "blocker.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(tmp_path / "blocker.txt" / "x.png")
    with pytest.raises(OutputError, match="give a file name"):
        check_output(tmp_path / "folder")
    with pytest.raises(OutputError, match="a file of that name exists"):
        check_output(tmp_path / "blocker.txt", "folder")
    assert check_output(tmp_path / "new" / "x.png") == tmp_path / "new" / "x.png"
    assert check_output(tmp_path / "folder", "folder") == tmp_path / "folder"
    assert sorted(os.listdir(tmp_path)) == ["blocker.txt", "folder"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_a_read_only_folder_is_one_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="no permission to write in"):
            write_file(locked / "a.txt", b"data")
        with pytest.raises(OutputError, match="no permission to write in"):
            check_output(locked / "a.txt")
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_place_that_takes_no_file_is_refused_even_for_root(tmp_path):
    """/proc takes no new file whatever the permissions say (root's included): the check tries."""
    with pytest.raises(OutputError, match="cannot write"):
        check_output("/proc/depthlens-out", "folder")
    with pytest.raises(OutputError, match="cannot write"):
        check_output("/proc/depthlens-out/results.json")
    assert check_output(tmp_path / "results.json") == tmp_path / "results.json"
    assert os.listdir(tmp_path) == []
