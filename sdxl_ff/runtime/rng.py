"""The process's random streams (Python, NumPy, torch CPU and CUDA): read into a checkpoint, restored on resume,
seeded at start."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Every global RNG a training step may touch (of CUDA: this process's device only)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def cuda_state_for(saved: torch.Tensor | list[torch.Tensor] | None, device_index: int) -> torch.Tensor | None:
    """The saved CUDA RNG state to give device `device_index`; None when the state holds none for it.

    States before this one saved a list with one entry per visible GPU; a machine may now show fewer.
    """
    if isinstance(saved, (list, tuple)):
        return saved[device_index] if device_index < len(saved) else None
    return saved


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = cuda_state_for(state.get("cuda"), torch.cuda.current_device())
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
