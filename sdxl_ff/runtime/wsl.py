"""Windows Subsystem for Linux: detecting it, and the data-loading choice that is safe there.

NVIDIA's "CUDA on WSL" user guide lists pinned system memory as limited under WSL 2, so batches are
not pinned there; everything else runs as on native Linux (see docs/wsl2-and-troubleshooting.md).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger("sdxl_ff")

PROC_VERSION = "/proc/version"


def running_under_wsl(proc_version: str | Path = PROC_VERSION) -> bool:
    """True under WSL: its kernels name themselves "...-microsoft-standard-WSL2" (WSL 1: "Microsoft")."""
    try:
        text = Path(proc_version).read_text(encoding="utf-8", errors="replace").lower()
    except OSError:  # not Linux, or /proc not mounted: not WSL
        return False
    return "microsoft" in text or "wsl" in text


def pin_memory_for(device_type: str, num_workers: int, proc_version: str | Path = PROC_VERSION) -> bool:
    """Pin batches for fast, asynchronous copies to a CUDA device, except under WSL; log what was chosen."""
    wsl = running_under_wsl(proc_version)
    pin = device_type == "cuda" and not wsl
    why = ("WSL2: pinned memory is limited there" if wsl and device_type == "cuda" else
           "CUDA" if pin else f"device {device_type}")
    log.info("data loading: %d worker process(es) (data.num_workers), pinned memory %s (%s)%s", num_workers,
             "on" if pin else "off", why, "; under WSL keep data and caches on the Linux file system, not /mnt/"
             if wsl else "")
    return pin


@functools.cache
def pinned_copies_allowed() -> bool:
    """Whether the trainer may pin host buffers for copies to and from the GPU that the host does not wait for
    (random draws, EMA on the CPU): with CUDA, except under WSL. Decided once per process."""
    import torch
    return torch.cuda.is_available() and not running_under_wsl()
