"""What a run shows: the progress bar, and the closing lines that say what to do next."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from sdxl_ff.config.schema import Config
from sdxl_ff.eval.sample_options import sample_command
from sdxl_ff.train.tracking import tensorboard_command


class StepBar:
    """The progress bar. It shows the loss of the last log line (`show_loss`): the loss is read from the device only
    when it is logged, never for the bar; the learning rate and epoch are redrawn at most twice a second."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc="training", unit="step", disable=not enabled,
                        dynamic_ncols=True)
        self.enabled, self.shown_at = enabled, 0.0
        self.postfix: dict[str, object] = {}

    def update(self, lr: float, epoch: int, extra: dict | None = None) -> None:
        self.bar.update(1)
        self.postfix.update(lr=f"{lr:.2e}", epoch=epoch, **(extra or {}))
        if self.enabled and time.monotonic() - self.shown_at >= 0.5:
            self._show()

    def show_loss(self, loss: float) -> None:
        """The loss just logged (a float already read), shown at once: the bar ends on the last logged loss."""
        self.postfix = {"loss": f"{loss:.4f}", **{k: v for k, v in self.postfix.items() if k != "loss"}}
        if self.enabled:
            self._show()

    def _show(self) -> None:
        self.bar.set_postfix(self.postfix)
        self.shown_at = time.monotonic()

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


def what_next(cfg: Config, grid: Path | None = None) -> str:
    """The run's last lines: how to look at it, sample it and use it, each command runnable as printed; the
    final eval grid, when there is one, closes them."""
    t = cfg.training
    lines = []
    if t.tensorboard.enabled:
        lines.append(f"  look at the curves:   {tensorboard_command(t.tensorboard.base_dir)}")
    lines.append(f"  render a sample:      {sample_command(t.output_dir, cfg.eval)}")
    if cfg.export.save_single_file:
        lines.append(f"  ComfyUI:              copy {Path(cfg.export.checkpoint_path).absolute()} into "
                     f"ComfyUI/models/checkpoints/ and pick it in the Load Checkpoint node")
    if grid is not None:
        lines.append(f"  look at the final eval images: {grid}")
    return "next:\n" + "\n".join(lines)
