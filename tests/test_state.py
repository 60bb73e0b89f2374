"""Atomic writes: a failure mid-write leaves the previous file or folder untouched."""

import os

import pytest

from sdxl_ff.state import replace_dir_atomic, write_atomic, write_bytes_atomic


def test_write_atomic_replaces(tmp_path):
    path = tmp_path / "a.bin"
    write_bytes_atomic(path, b"one")
    write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "a.bin"
    write_bytes_atomic(path, b"good")

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(path, broken)
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_replace_dir_keeps_old_on_failure_and_carries_extra_files(tmp_path):
    target = tmp_path / "out"
    with replace_dir_atomic(target) as tmp:
        (tmp / "weights").write_text("v1")
        (tmp / "trainer_state.pt").write_text("s1")
    with pytest.raises(RuntimeError):
        with replace_dir_atomic(target) as tmp:
            (tmp / "weights").write_text("v2-partial")
            raise RuntimeError("crash")
    assert (target / "weights").read_text() == "v1"
    with replace_dir_atomic(target) as tmp:
        (tmp / "weights").write_text("v3")
    assert (target / "weights").read_text() == "v3"
    assert (target / "trainer_state.pt").read_text() == "s1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
