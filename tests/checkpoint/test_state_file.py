"""trainer_state.pt is read without running code: only tensors, numbers, strings and numpy's RNG state load."""

import os
import random

import numpy as np
import pytest
import torch

from sdxl_ff.checkpoint.checkpointer import ResumeError, load_state
from sdxl_ff.runtime.rng import rng_state


class MakesAFolder:
    """What a hostile state could carry: unpickling it calls os.makedirs (any callable would do)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_crafted_state_creates_nothing_and_the_error_names_the_file(tmp_path):
    marker = tmp_path / "created-by-the-state"
    path = tmp_path / "trainer_state.pt"
    torch.save({"global_step": 3, "fingerprint": {}, "payload": MakesAFolder(str(marker))}, path)
    with pytest.raises(ResumeError) as info:
        load_state(path)
    assert not marker.exists()
    message = str(info.value)
    assert message.startswith(f"{path}: refused:") and "\n" not in message
    assert "posix.makedirs" in message or "os.makedirs" in message


def test_a_real_state_with_every_rng_still_loads_exactly(tmp_path):
    random.seed(5)
    np.random.seed(7)
    np.random.random(3)  # a numpy state mid-stream (pos != 624)
    state = {"global_step": 4, "fingerprint": {"architecture": {"unet": "ab"}, "trained": ["unet"], "optimizer": "x"},
             "rng": rng_state(), "noise_generator": torch.Generator().manual_seed(3).get_state(),
             "optimizer": torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 0.99)).state_dict(),
             "losses": [0.5, float("nan")], "sampler": {"order": [[1, 2]], "epoch": 0}, "lr_factor": 0.5,
             "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}}
    path = tmp_path / "trainer_state.pt"
    torch.save(state, path)
    loaded = load_state(path)
    kind, keys, pos, has_gauss, gauss = loaded["rng"]["numpy"]
    assert (kind, pos, has_gauss, gauss) == state["rng"]["numpy"][:1] + state["rng"]["numpy"][2:]
    assert np.array_equal(keys, state["rng"]["numpy"][1]) and keys.dtype == np.uint32
    assert loaded["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    np.random.set_state(loaded["rng"]["numpy"])  # the restored stream is usable as saved
