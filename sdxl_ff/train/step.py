"""One optimizer step of the training loop, and the steps of a run: how many, and the batches they read.

`train_step()` is the algorithm: micro-batches, forward, loss, backward, clip, step. The host never waits
for the device inside it, except for the one reduction per step that several processes need: the stop flag,
the loss and its finiteness travel together (`step_signals`). One process checks training.detect_anomaly one
step late, without waiting (`stability.AnomalyWatch`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from sdxl_ff.checkpoint.checkpointer import StopRequest
from sdxl_ff.checkpoint.model_folder import last_good_state
from sdxl_ff.config.errors import AnomalyError, ConfigError
from sdxl_ff.config.schema import Config
from sdxl_ff.data.batch_sampler import SameSizeBatchSampler
from sdxl_ff.objective.predict import predict, weighted_loss
from sdxl_ff.train.lr_schedule import lr_factor, set_learning_rates
from sdxl_ff.train.run import Run, StepResult
from sdxl_ff.train.stability import anomaly_message, clip_gradients_async


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


def step_signals(accelerator: Accelerator, loss: torch.Tensor, nonfinite: torch.Tensor, stop: StopRequest,
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


def endless_batches(loader: DataLoader, sampler: SameSizeBatchSampler, epoch: int, start: int) -> Iterator:
    """Yield (epoch, index_in_epoch, batch) forever, resuming at (epoch, start)."""
    while True:
        sampler.epoch, sampler.start = epoch, start
        for index, batch in enumerate(loader, start=start):
            yield epoch, index, batch
        epoch, start = epoch + 1, 0


def total_optimizer_steps(cfg: Config, batches_per_epoch: int) -> int:
    """The stop condition in optimizer steps: num_steps, num_epochs, or whichever comes first."""
    t = cfg.training
    candidates = []
    if t.num_steps is not None:
        candidates.append(t.num_steps)
    if t.num_epochs is not None:
        candidates.append(max(1, math.ceil(t.num_epochs * batches_per_epoch / t.grad_accum_steps)))
    return min(candidates)


def check_steps_left(cfg: Config, saved_step: int, total_steps: int) -> None:
    """Refuse, before any model loads, a resume whose state already reached the stop condition (0 steps left)."""
    if saved_step < total_steps:
        return
    t = cfg.training
    keys = [f"training.num_steps is {t.num_steps}"] if t.num_steps is not None else []
    if t.num_epochs is not None:
        keys.append(f"training.num_epochs is {t.num_epochs} ({total_steps} optimizer steps)")
    remedy = f"raise training.num_steps above {saved_step} (e.g. --set training.num_steps={saved_step + total_steps})"
    if t.num_epochs is not None:
        remedy += " or raise training.num_epochs"
    raise ConfigError(f"{' and '.join(keys)}, but the resumed state {t.resume_state_path} is already at step "
                      f"{saved_step}: nothing is left to train. num_steps/num_epochs count the whole run including "
                      f"the resumed steps; {remedy} to train further")
