"""TensorBoard logging (training.tensorboard): scalars per step, run metadata, eval grids. Main process only."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from sdxl_ff.config.load import to_dict
from sdxl_ff.config.schema import Config

log = logging.getLogger(__name__)


def module_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One lr per module name: the per-parameter optimizer (full_bf16, fused_backward) has one group per tensor."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        rates.setdefault(group.get("name", "group"), float(group["lr"]))  # torchao's is a tensor, changed in place
    return rates


def tensorboard_command(base_dir: str) -> str:
    """The command that shows the runs under base_dir, runnable as printed: this interpreter, an absolute path."""
    return shlex.join([sys.executable, "-m", "tensorboard.main", "--logdir", str(Path(base_dir).absolute())])


class Tracker:
    """Writes TensorBoard events when enabled on the main process; otherwise every call does nothing."""

    def __init__(self, cfg: Config, main_process: bool, start_step: int = 0):
        """`start_step`: the step a resumed run continues from (0 for a fresh run)."""
        tb = cfg.training.tensorboard
        self.log_grad_norm, self.log_scaler = tb.log_grad_norm, tb.log_scaler
        self.start_step = start_step
        self.writer = None
        self.pending: list[tuple] = []
        if tb.enabled and main_process:
            from torch.utils.tensorboard import SummaryWriter
            # A resume after a crash repeats the steps after its checkpoint: purge_step hides what the crashed
            # run logged from there on, so each step has one value and the curve continues without a fold.
            self.writer = SummaryWriter(log_dir=tb.log_dir, purge_step=start_step + 1 if start_step else None)
            log.info("tensorboard: writing to %s (%s)", tb.log_dir, tensorboard_command(tb.base_dir))

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    @property
    def wants_grad_norm(self) -> bool:
        return self.enabled and self.log_grad_norm

    def log_run(self, cfg: Config, effective_batch: int, samples: int, sizes: dict[tuple[int, int], int]) -> None:
        """Run metadata as text and the resolution (bucket) distribution."""
        if not self.enabled:
            return
        step = self.start_step  # a resumed run records its (possibly changed) config where it starts
        self.writer.add_text("run/metadata", f"effective batch size: {effective_batch}  \n"
                                             f"samples: {samples}  \nconfig: {cfg.source}", step)
        self.writer.add_text("run/config", "```json\n" + json.dumps(to_dict(cfg), indent=2) + "\n```", step)
        for (h, w), count in sorted(sizes.items()):
            self.writer.add_scalar(f"data/bucket_{w}x{h}", count, step)
        sizes_flat = np.array([h * w for (h, w), n in sizes.items() for _ in range(n)], dtype=np.float64)
        self.writer.add_histogram("data/bucket_pixels", sizes_flat, step)

    def log_step(self, step: int, loss: torch.Tensor | float, optimizer: torch.optim.Optimizer,
                 grad_norm: torch.Tensor | float | None, scaler) -> None:
        """Loss, one learning rate per trained module (unet / text_encoder / text_encoder_2), grad norm, AMP scale.

        Kept as given (device tensors too) until `flush()`: reading them every step would make the host wait.
        """
        if not self.enabled:
            return
        scale = None
        if scaler is not None and self.log_scaler:  # get_scale() waits for the device; update() changes it in place
            scale = scaler._get_scale_async()
            scale = scaler.get_scale() if scale is None else scale.detach().clone()  # None: no step taken yet
        self.pending.append((step, loss, module_learning_rates(optimizer),
                             grad_norm if self.log_grad_norm else None, scale))

    def flush(self) -> None:
        """Write the steps logged since the last flush (one wait for the device for all of them)."""
        if not self.enabled:
            return
        for step, loss, rates, grad_norm, scale in self.pending:
            self.writer.add_scalar("train/loss", float(loss), step)
            for name, lr in rates.items():
                self.writer.add_scalar(f"lr/{name}", lr, step)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", float(grad_norm), step)
            if scale is not None:
                self.writer.add_scalar("train/amp_scale", float(scale), step)
        self.pending.clear()

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Named scalars at one step (e.g. val/loss, val/loss_t500)."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        """One text entry (e.g. the divergence warning), written at once."""
        if not self.enabled:
            return
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def log_eval(self, phase: str, step: int, grid, summary: str) -> None:
        """The eval grid as an image and a short text entry under eval/live or eval/final."""
        if not self.enabled:
            return
        self.writer.add_image(f"eval/{phase}/grid", np.asarray(grid), step, dataformats="HWC")
        self.writer.add_text(f"eval/{phase}", summary, step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.writer.close()
