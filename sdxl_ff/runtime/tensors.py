"""Tensors between the host and the device, and as this process holds them: copies that do not make the host
wait, and a sharded tensor's local part."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from sdxl_ff.runtime.wsl import pinned_copies_allowed


def from_host(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A tensor made on the host (random draws, time ids, token ids), on `device` without the host waiting for the
    copy: on CUDA through pinned memory (pageable under WSL, where pinned memory is limited), queued non-blocking.
    The values are the host's, bit for bit, whatever the device."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if pinned_copies_allowed():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view of it); any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
