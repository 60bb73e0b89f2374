"""The trainer's own progress: where the run stands in the data, the losses so far, and its random streams.

Saved into trainer_state.pt and restored from it by `state_dict()` / `load_state_dict()`, next to each
other (torchtitan's TrainState). The step losses stay on the device until something reads them (the log
line, the progress bar, a save): reading a loss makes the host wait for the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdxl_ff.runtime.rng import rng_state, set_rng_state


@dataclass
class TrainProgress:
    """Optimizer steps done, the position of the next batch (epoch, batch_in_epoch), the losses, the generators.

    `noise_generator` draws the noise and timesteps of every batch; `rounding_generator` rounds bf16 weights
    (model.full_bf16). The global RNGs (python, numpy, torch, CUDA) are saved with them.
    """
    seed: int
    noise_generator: torch.Generator
    rounding_generator: torch.Generator
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    _losses: list[float] = field(default_factory=list)
    _unread: list[torch.Tensor | float] = field(default_factory=list)  # step losses not read yet, in order

    def add_loss(self, loss: torch.Tensor | float) -> None:
        """Record one optimizer step's loss; a tensor is read only when the losses are."""
        self._unread.append(loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else float(loss))
        if len(self._unread) >= 4096:  # bound the tensors held between reads on a run that never logs
            self.losses  # noqa: B018

    @property
    def losses(self) -> list[float]:
        """Every step's loss as a float (one wait for the device for all the losses not read yet)."""
        if self._unread:
            tensors = [x for x in self._unread if isinstance(x, torch.Tensor)]
            read = iter(torch.stack(tensors).double().cpu().tolist() if tensors else [])
            self._losses += [next(read) if isinstance(x, torch.Tensor) else x for x in self._unread]
            self._unread.clear()
        return self._losses

    def recent_loss(self, steps: int) -> float:
        """The mean loss of the last `steps` steps."""
        recent = self.losses[-steps:]
        return sum(recent) / len(recent)

    def state_dict(self) -> dict:
        """Progress as trainer_state.pt holds it (the keys every earlier state has)."""
        return {"global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "seed": self.seed, "losses": list(self.losses), "noise_generator": self.noise_generator.get_state(),
                "rounding_generator": self.rounding_generator.get_state(), "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped: step, position, losses, the generators and the global RNGs."""
        self.global_step, self.epoch, self.batch_in_epoch = state["global_step"], state["epoch"], \
            state["batch_in_epoch"]
        self.seed = state["seed"]
        self._losses, self._unread = list(state["losses"]), []
        self.noise_generator.set_state(state["noise_generator"])
        self.rounding_generator.set_state(state["rounding_generator"])
        set_rng_state(state["rng"])
