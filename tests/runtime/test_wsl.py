"""WSL detection from /proc/version and the pinned-memory choice made from it."""

import logging

import pytest

from sdxl_ff.runtime.wsl import pin_memory_for, running_under_wsl

WSL2 = "Linux version 5.15.167.4-microsoft-standard-WSL2 (root@f9c826d3017f) (gcc (GCC) 11.2.0) #1 SMP Tue Nov 5\n"
WSL1 = "Linux version 4.4.0-19041-Microsoft (Microsoft@Microsoft.com) (gcc version 5.4.0 (GCC) ) #1237-Microsoft\n"
NATIVE = "Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14)) #1 SMP\n"


@pytest.mark.parametrize("text, wsl", [(WSL2, True), (WSL1, True), (NATIVE, False)])
def test_detection_reads_proc_version(tmp_path, text, wsl):
    (tmp_path / "version").write_text(text)
    assert running_under_wsl(tmp_path / "version") is wsl


def test_missing_proc_version_is_not_wsl(tmp_path):
    assert running_under_wsl(tmp_path / "absent") is False


@pytest.mark.parametrize("text, device, pinned, reason", [
    (WSL2, "cuda", False, "pinned memory off (WSL2: pinned memory is limited there); under WSL keep data"),
    (NATIVE, "cuda", True, "pinned memory on (CUDA)"),
    (NATIVE, "cpu", False, "pinned memory off (device cpu)"),
])
def test_pinned_memory_choice_is_logged(tmp_path, caplog, text, device, pinned, reason):
    (tmp_path / "version").write_text(text)
    with caplog.at_level(logging.INFO, logger="sdxl_ff"):
        assert pin_memory_for(device, 2, tmp_path / "version") is pinned
    assert f"data loading: 2 worker process(es) (data.num_workers), {reason}" in caplog.text
