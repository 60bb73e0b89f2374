"""Learning-rate factors: pure functions of the optimizer step.

`step` is the 1-based number of the optimizer step about to be taken (the value `global_step`
has right after it). The trainer sets every parameter group's rate to its base rate × factor
before each optimizer step, so UNet and text encoders follow the same curve.

Conventions (all schedules):
- warmup over W steps: factor n/W at step n ≤ W, so step W is the first at the full rate and no
  step is wasted at rate 0;
- decays run over the D = total − W steps after the warmup with progress p = (n − W)/D, so the
  last step reaches `min_factor` exactly: linear 1 − p, cosine ½(1 + cos πp), rescaled into
  [min_factor, 1];
- `cosine_restarts` repeats the cosine decay over cycles of cycle_steps, cycle_steps·cycle_mult,
  cycle_steps·cycle_mult², ... steps (SGDR); each cycle's last step reaches min_factor and the
  next step starts again near 1.
Without the `lr_scheduler` block: the legacy behaviour, a linear warmup over `lr_warmup_steps`,
then the constant base rate.
"""

from __future__ import annotations

import math

from sdxl_ff.config.schema import LRSchedulerConfig, TrainingConfig
from sdxl_ff.optim.optimizers import set_group_lr


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: step/W for step ≤ W, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def cosine_restart_progress(index: int, cycle_steps: int, cycle_mult: float) -> float:
    """Progress in (0, 1] of the `index`-th (1-based) step after the warmup within its restart cycle.

    Cycle k is cycle_steps·cycle_mult**k steps long and starts after cycle_steps·(m**k − 1)/(m − 1)
    steps (closed form, so a long run costs nothing per step).
    """
    i, length, m = index - 1, float(cycle_steps), cycle_mult
    if m == 1.0:
        k = i // cycle_steps
    else:
        k = math.floor(math.log1p(i * (m - 1) / length) / math.log(m))

    def start(c: int) -> float:
        return c * length if m == 1.0 else length * (m**c - 1) / (m - 1)

    while k > 0 and i < start(k):  # guard against rounding in the logarithm
        k -= 1
    while i >= start(k + 1):
        k += 1
    return (i + 1 - start(k)) / (start(k + 1) - start(k))


def decay_shape(kind: str, progress: float) -> float:
    """1 at progress 0, 0 at progress 1."""
    progress = min(1.0, max(0.0, progress))
    if kind == "linear_decay":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduled_factor(step: int, sched: LRSchedulerConfig, total_steps: int) -> float:
    """The factor of the `lr_scheduler` block at 1-based optimizer step `step`."""
    if step <= sched.warmup_steps:
        return warmup_factor(step, sched.warmup_steps)
    if sched.type == "constant":
        return 1.0
    after = step - sched.warmup_steps
    if sched.type == "cosine_restarts":
        shape = decay_shape("cosine_decay", cosine_restart_progress(after, sched.cycle_steps, sched.cycle_mult))
    else:
        shape = decay_shape(sched.type, after / max(1, total_steps - sched.warmup_steps))
    return sched.min_factor + (1.0 - sched.min_factor) * shape


def lr_factor(step: int, training: TrainingConfig, total_steps: int) -> float:
    """The factor for every parameter group's base rate at 1-based optimizer step `step`."""
    if training.lr_scheduler is None:
        return warmup_factor(step, training.lr_warmup_steps)
    return scheduled_factor(step, training.lr_scheduler, total_steps)


def describe(training: TrainingConfig) -> str:
    """One log line saying which curve was chosen."""
    s = training.lr_scheduler
    if s is None:
        warm = f"linear warmup over {training.lr_warmup_steps} steps, then " if training.lr_warmup_steps else ""
        return f"{warm}constant (no lr_scheduler block)"
    text = f"{s.type}, warmup {s.warmup_steps} steps"
    if s.type != "constant":
        text += f", min_factor {s.min_factor:g}"
    if s.type == "cosine_restarts":
        text += f", cycles of {s.cycle_steps} steps x {s.cycle_mult:g}"
    return text


def set_learning_rates(optimizer, base_lrs: list[float], factor: float) -> None:
    """Give each parameter group its base rate × factor."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        set_group_lr(group, base * factor)


