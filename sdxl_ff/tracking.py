"""TensorBoard logging (training.tensorboard): scalars per step, run metadata, eval grids. Main process only."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from .config import Config, to_dict

log = logging.getLogger(__name__)


def module_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One lr per module name: the per-parameter optimizer (full_bf16, fused_backward) has one group per tensor."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        rates.setdefault(group.get("name", "group"), group["lr"])
    return rates


class Tracker:
    """Writes TensorBoard events when enabled on the main process; otherwise every call does nothing."""

    def __init__(self, cfg: Config, main_process: bool):
        tb = cfg.training.tensorboard
        self.log_grad_norm, self.log_scaler = tb.log_grad_norm, tb.log_scaler
        self.writer = None
        if tb.enabled and main_process:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=tb.log_dir)
            log.info("tensorboard: writing to %s (tensorboard --logdir %s)", tb.log_dir, tb.base_dir)

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
        self.writer.add_text("run/metadata", f"effective batch size: {effective_batch}  \n"
                                             f"samples: {samples}  \nconfig: {cfg.source}", 0)
        self.writer.add_text("run/config", "```json\n" + json.dumps(to_dict(cfg), indent=2) + "\n```", 0)
        for (h, w), count in sorted(sizes.items()):
            self.writer.add_scalar(f"data/bucket_{w}x{h}", count, 0)
        sizes_flat = np.array([h * w for (h, w), n in sizes.items() for _ in range(n)], dtype=np.float64)
        self.writer.add_histogram("data/bucket_pixels", sizes_flat, 0)

    def log_step(self, step: int, loss: float, optimizer: torch.optim.Optimizer,
                 grad_norm: float | None, scaler) -> None:
        """Loss, one learning rate per trained module (unet / text_encoder / text_encoder_2), grad norm, AMP scale."""
        if not self.enabled:
            return
        self.writer.add_scalar("train/loss", loss, step)
        for name, lr in module_learning_rates(optimizer).items():
            self.writer.add_scalar(f"lr/{name}", lr, step)
        if grad_norm is not None and self.log_grad_norm:
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
        if scaler is not None and self.log_scaler:
            self.writer.add_scalar("train/amp_scale", scaler.get_scale(), step)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Named scalars at one step (e.g. val/loss, val/loss_t500)."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
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
            self.writer.close()
