"""One optimizer step of the training loop, and the run it belongs to, saved and restored in one place.

`train_step()` is the algorithm: micro-batches, forward, loss, backward, clip, step. The host never waits
for the device inside it, except for the one reduction per step that several processes need: the stop flag,
the loss and its finiteness travel together (`step_signals`). One process checks training.detect_anomaly one
step late, without waiting (`stability.AnomalyWatch`). `Run.state_dict()` / `Run.load_state_dict()` are the
whole trainer_state.pt.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdxl_ff.checkpoint.checkpointer import FORMAT_VERSION, Checkpointer, StopRequest, restore
from sdxl_ff.checkpoint.model_folder import last_good_state
from sdxl_ff.checkpoint.progress import TrainProgress
from sdxl_ff.config.errors import AnomalyError
from sdxl_ff.config.schema import Config
from sdxl_ff.eval.sample_options import sample_command
from sdxl_ff.model.parts import SDXLParts
from sdxl_ff.model.trainables import Trainables
from sdxl_ff.objective.predict import LossWeighting, Shard, predict, weighted_loss
from sdxl_ff.optim.ema import EMA
from sdxl_ff.parallel.strategy import Parallelism
from sdxl_ff.train.divergence import DivergenceWatch
from sdxl_ff.train.lr_schedule import lr_factor, set_learning_rates
from sdxl_ff.train.stability import AnomalyWatch, anomaly_message, clip_gradients_async
from sdxl_ff.train.tracking import Tracker, tensorboard_command

log = logging.getLogger("sdxl_ff")


@dataclass
class Run:
    """Everything one training run holds: the models, the optimizer, the data order, the progress."""
    cfg: Config
    accelerator: object
    parallel: Parallelism  # one process, DDP or FSDP2: wrapping, optimizer, EMA, saving (parallel/strategy.py)
    parts: SDXLParts
    trainables: Trainables
    trained_modules: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: object  # the diffusers noise scheduler
    weighting: LossWeighting
    sampler: object  # dataset.SameSizeBatchSampler
    progress: TrainProgress
    total_steps: int
    rates: dict[str, float | None]  # the configured base learning rate of each module
    fingerprint: dict
    tracker: Tracker
    checkpointer: Checkpointer
    ema: EMA | None = None
    memory_check: object = None  # plan_report.MemoryCheck on CUDA: the planned peak next to the measured one
    first_step: int = 0  # the step this process started (or resumed) at
    sampling: object = None  # diffusion.TimestepSampling: how training timesteps are drawn
    validator: object = None  # validation.Validator: the deterministic validation loss, or None
    held_bytes: dict[str, int] | None = None  # what this process held at the first step (measured when sharded)
    watches: dict[str, DivergenceWatch] = field(  # the series watched for divergence (train/divergence.py)
        default_factory=lambda: {name: DivergenceWatch(name) for name in ("train/loss", "val/loss")})
    shard: Shard = field(init=False)
    params: list[torch.nn.Parameter] = field(init=False)  # the trained parameters, for clipping
    anomalies: AnomalyWatch = field(init=False)  # training.detect_anomaly on one process (several: step_signals)

    def __post_init__(self) -> None:
        # Every process draws the randomness of the whole global batch and keeps its share (objective/predict.py),
        # so N processes see exactly the noise one process would.
        self.shard = Shard(self.accelerator.process_index, self.accelerator.num_processes)
        self.params = self.trainables.parameters()
        self.anomalies = AnomalyWatch(self.cfg.training.detect_anomaly and self.accelerator.num_processes == 1)

    def check_anomalies(self) -> None:
        """Raise AnomalyError if the last step watched had a NaN/Inf loss: called before anything is saved."""
        self.anomalies.check(lambda: last_good_state(self.cfg, self.checkpointer))

    @property
    def base_lrs(self) -> list[float]:
        return [self.rates[group["name"]] for group in self.optimizer.param_groups]

    def state_dict(self, with_ema: bool = True) -> dict:
        """trainer_state.pt: progress, data position, optimizer, scaler, EMA and what the state fits.

        `with_ema=False` for the final save, which reads the EMA itself while it is swapped in.
        """
        p, t = self.progress, self.cfg.training
        scaler = self.accelerator.scaler
        state = {
            "format_version": FORMAT_VERSION, **p.state_dict(),
            "sampler": self.sampler.state_dict(p.epoch, p.batch_in_epoch),
            "optimizer": None, "scaler": scaler.state_dict() if scaler is not None else None,
            "model_id": self.cfg.model.id, "trained": list(self.trainables.modules), "fingerprint": self.fingerprint,
            "ema": None, "base_lrs": self.rates, "lr_factor": lr_factor(max(1, p.global_step), t, self.total_steps),
            "divergence": {name: watch.state_dict() for name, watch in self.watches.items()},
        }
        # the optimizer state and the EMA, whole here or in the checkpoint's shards (sharded: their counters here)
        state.update(self.parallel.held_state(self.optimizer, self.ema, with_ema))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (read by checkpoint.load_resume_state, checked by check_compatible)."""
        self.parallel.load_held_state(self, state)  # the EMA (and, sharded, the optimizer state from the shards)
        restore(state, self.optimizer, self.accelerator, self.rates)
        if state["sampler"]:
            self.sampler.check_order(state["sampler"])
        for name, saved in state.get("divergence", {}).items():  # states before issue 28 have none: start afresh
            self.watches[name].load_state_dict(saved)
        self.progress.load_state_dict(state)  # last: it sets the global RNGs


@dataclass
class StepResult:
    """What one optimizer step reports; `loss` is a device tensor unless a reduction already read it."""
    loss: torch.Tensor | float
    grad_norm: torch.Tensor | None
    stop: bool


def micro_batch_sync(run: Run, last: bool) -> contextlib.AbstractContextManager:
    """Accumulate locally; gradients are all-reduced once, on the last micro-batch."""
    if last:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for module in run.trained_modules:
        stack.enter_context(run.accelerator.no_sync(module))
    return stack


def train_step(run: Run, batches: Iterator, stop: StopRequest) -> StepResult:
    """One optimizer step over training.grad_accum_steps micro-batches; raises AnomalyError on a NaN/Inf loss."""
    t, p, parts, accelerator = run.cfg.training, run.progress, run.parts, run.accelerator
    step = p.global_step + 1
    set_learning_rates(run.optimizer, run.base_lrs, lr_factor(step, t, run.total_steps))
    micro_losses, paths = [], []
    for micro in range(t.grad_accum_steps):
        p.epoch, index, batch = next(batches)
        p.batch_in_epoch = index + 1
        with micro_batch_sync(run, last=micro == t.grad_accum_steps - 1):
            with accelerator.autocast():
                out = predict(parts.unet, parts.vae, (parts.tokenizer, parts.tokenizer_2),
                              (parts.text_encoder, parts.text_encoder_2), run.scheduler, batch, p.noise_generator,
                              noise_offset=t.noise_offset, shard=run.shard, sampling=run.sampling,
                              input_perturbation=t.input_perturbation, device=accelerator.device)
            loss = weighted_loss(out, run.scheduler, run.weighting, step, batch.get("loss_weight"))
            accelerator.backward(loss / t.grad_accum_steps)
        micro_losses.append(loss.detach().float())
        paths.append(batch["path"])
    grad_norm = None if t.fused_backward else clip_gradients_async(
        accelerator, run.params, t.max_grad_norm, measure=run.tracker.wants_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    p.global_step = step
    losses = torch.stack(micro_losses)
    step_loss, bad, stop_now = step_signals(accelerator, losses.sum() / t.grad_accum_steps,
                                            (~torch.isfinite(losses)).sum(), stop,
                                            t.detect_anomaly and not run.anomalies.enabled)
    run.check_anomalies()  # the previous step's losses, now that this step is queued
    run.anomalies.watch(step, losses, paths)
    if bad:
        first = next((i for i, v in enumerate(losses.tolist()) if not math.isfinite(v)), None)
        value = losses[first].item() if first is not None else float(step_loss)
        raise AnomalyError(anomaly_message(value, step, paths[first if first is not None else -1],
                                           last_good_state(run.cfg, run.checkpointer)))
    if run.ema is not None:
        run.ema.update(step)
    return StepResult(step_loss, grad_norm, stop_now)


def step_signals(accelerator, loss: torch.Tensor, nonfinite: torch.Tensor, stop: StopRequest,
                 check_finite: bool) -> tuple[torch.Tensor | float, bool, bool]:
    """(the step's loss, whether any process saw a NaN/Inf loss, whether any process was asked to stop).

    One all-reduce carries all three under several processes (which must agree on stopping, so it is read
    at once); one process reads the device only when it must check finiteness, and keeps the loss a tensor.
    """
    n = accelerator.num_processes
    if n == 1 and not check_finite:
        return loss, False, stop.requested
    signals = torch.stack([loss.float(), nonfinite.float(), torch.tensor(float(stop.requested), device=loss.device)])
    if n > 1:
        signals = accelerator.reduce(signals, reduction="sum")
    total, bad, stopping = signals.tolist()
    return (total / n if n > 1 else loss), check_finite and bad > 0, stopping > 0


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
