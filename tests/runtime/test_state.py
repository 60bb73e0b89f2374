"""Atomic writes: a failure mid-write leaves the previous file or folder untouched."""

import errno
import os
from pathlib import Path

import pytest
import torch
from conftest import small_disk_at

from sdxl_ff.runtime.files import (
    FolderKept,
    describe_write_error,
    replace_dir_atomic,
    save_torch_atomic,
    write_atomic,
    write_bytes_atomic,
    write_problem,
)
from sdxl_ff.runtime.rng import cuda_state_for


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


@pytest.mark.parametrize("into", ["file", "folder"])
def test_full_disk_is_named_even_when_cleanup_frees_it(tmp_path, into):
    """torch.save reports a full disk as "iostream error"; once the partial file is gone the disk looks roomy again."""
    with small_disk_at(tmp_path / "disk", 100) as disk:
        big = torch.zeros(40 * 2**20)  # 160 MB: fails part-way; removing the part frees > 64 MB
        with pytest.raises(OSError) as caught:
            if into == "file":
                save_torch_atomic(big, disk / "state.pt")
            else:
                with replace_dir_atomic(disk / "model") as tmp:
                    torch.save(big, tmp / "weights.pt")
        assert caught.value.errno == 28 and "No space left" in str(caught.value)
        assert describe_write_error(caught.value, disk) == "the disk is full"
        assert list(disk.iterdir()) == []


def test_cuda_rng_state_is_per_device_and_survives_fewer_gpus():
    one, two = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    assert cuda_state_for(one, 3) is one  # this format: the saving process's own device, given to ours
    assert cuda_state_for([one, two], 1) is two  # the earlier format: one state per GPU of the saving machine
    assert cuda_state_for([one, two], 2) is None  # resumed where more GPUs are visible than were saved: no IndexError
    assert cuda_state_for(None, 0) is None  # saved on a machine without CUDA


def test_write_probe_leaves_nothing_and_reports_a_file_in_the_way(tmp_path):
    assert write_problem(tmp_path / "a" / "b") is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    assert write_problem(tmp_path / "f" / "sub") == f"{tmp_path / 'f'} is a file, not a folder"


def test_write_probe_shares_folders_with_a_run_starting_at_the_same_moment(tmp_path, monkeypatch):
    # The race CI met: two runs sharing a cache start together and both probe its folders.
    import sdxl_ff.runtime.files as state
    real_mkdir, real_tempfile = Path.mkdir, state.tempfile.TemporaryFile
    first = tmp_path / "first"

    def other_run_mkdirs_first(self, *args, **kwargs):  # between this probe's look and its mkdir
        if self == first / "latents" and not self.exists():
            real_mkdir(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_run_mkdirs_first)
    assert write_problem(first / "latents" / "deep") is None
    assert [p.name for p in first.rglob("*")] == ["latents"]  # the other run's folder stays, ours went
    monkeypatch.setattr(Path, "mkdir", real_mkdir)

    second = tmp_path / "second"

    def other_run_writes_meanwhile(*args, **kwargs):  # into the folder this probe has just made
        (second / "latents" / "entry.pt").write_bytes(b"theirs")
        return real_tempfile(*args, **kwargs)

    monkeypatch.setattr(state.tempfile, "TemporaryFile", other_run_writes_meanwhile)
    assert write_problem(second / "latents") is None
    assert (second / "latents" / "entry.pt").read_bytes() == b"theirs"

    third = tmp_path / "third" / "latents"
    removals = []

    def other_probe_cleans_up_meanwhile(*args, **kwargs):  # its own clean-up removes the folder we both made
        if not removals:
            removals.append(third)
            third.rmdir()
        return real_tempfile(*args, **kwargs)

    monkeypatch.setattr(state.tempfile, "TemporaryFile", other_probe_cleans_up_meanwhile)
    assert write_problem(third) is None and removals == [third]
    assert not (tmp_path / "third").exists()  # tried again, and left nothing behind


def test_replace_dir_keeps_symlinks_and_copies_what_cannot_be_linked(tmp_path, monkeypatch):
    """Issue 28.1: `logs` a symlink to another filesystem made the carry-over fail with EXDEV."""
    target, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "events").write_text("tb")
    with replace_dir_atomic(target) as tmp:
        (tmp / "weights").write_text("v1")
    (target / "checkpoints" / "step-1").mkdir(parents=True)
    (target / "checkpoints" / "step-1" / "w").write_text("c1")
    (target / "logs").symlink_to(elsewhere)
    (target / "checkpoints" / "latest").symlink_to("step-1")
    real_link = os.link
    linked = []

    def cross_device(src, dst, **kw):  # checkpoints/ lies on another filesystem; the rest links
        if "checkpoints" in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))
        linked.append(Path(src).name)
        return real_link(src, dst, **kw)

    monkeypatch.setattr(os, "link", cross_device)
    with replace_dir_atomic(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert os.readlink(target / "logs") == str(elsewhere) and (target / "logs" / "events").read_text() == "tb"
    assert os.readlink(target / "checkpoints" / "latest") == "step-1"
    copied = target / "checkpoints" / "step-1" / "w"
    assert copied.read_text() == "c1" and copied.stat().st_nlink == 1 and linked == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


def test_replace_dir_keeps_the_complete_new_folder_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with replace_dir_atomic(target) as tmp:
        (tmp / "weights").write_text("v1")
    (target / "extra").write_text("x")

    def refused(src, dst, **kw):
        raise OSError(errno.EIO, "Input/output error", str(src))

    monkeypatch.setattr(os, "link", refused)  # EIO: not a reason to copy instead
    with pytest.raises(FolderKept) as info:
        with replace_dir_atomic(target, keep_as=tmp_path / "kept") as tmp:
            (tmp / "weights").write_text("v2")
    assert info.value.kept == tmp_path / "kept" and info.value.errno == errno.EIO
    assert str(info.value) == f"kept the new folder as {tmp_path / 'kept'}: Input/output error (errno 5 EIO: " \
                              f"{target / 'extra'})"
    assert (target / "weights").read_text() == "v1" and (target / "extra").read_text() == "x"
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["weights"]  # nothing half-carried
    assert (tmp_path / "kept" / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "out"]
