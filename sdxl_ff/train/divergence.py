"""Silent divergence: a logged loss that climbs far above its own best and stays there.

A run whose loss jumps from 0.04 to 1.05 and stays there trains a collapsed model with exit 0 unless something
watches. `DivergenceWatch` follows one logged series (train/loss at each log line, val/loss at each validation)
with this rule:

    m_i   = EMA of the logged values: m_1 = v_1, m_i = m_{i-1} + SMOOTHING · (v_i − m_{i-1})
    best  = min(m_1 … m_i), the best running mean so far
    far_i = v_i > FACTOR · best, or v_i is NaN / infinite
    the series has diverged when far holds for WINDOW logged values in a row.

It fires once per series and run, naming the step of the first value of that streak and the last step logged
before it (the newest checkpoint at or before that step is the one to go back to). The bar is the running mean's
minimum, not the lowest value, so one lucky batch (a diffusion loss varies several-fold with the drawn timesteps)
does not set it; the streak counts values, so one unlucky batch does not cross it. It reads only values that were
already logged: no extra wait for the device. Its state travels in trainer_state.pt (`state_dict`), so a resumed
run keeps its best.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from sdxl_ff.config.errors import UserError

# A healthy tiny-model run (configs/quickstart.json, 300 steps) logs no value above 2.34 x its best running mean at
# log_every 1 and none above 1.06 x at log_every 10; the divergence of issue 28 was 26x (0.04 -> 1.05).
FACTOR = 3.0
SMOOTHING = 0.3  # the running mean's weight of a new value: about the last 3 logged values count
WINDOW = 5  # logged values in a row: 50 steps at the default training.log_every 10


@dataclass(frozen=True)
class Divergence:
    """What fired: the series, the step of the first far value, the last step logged before it, and the values."""
    series: str
    began_at: int
    last_good_step: int | None
    last_value: float
    best: float
    best_step: int
    detected_at: int

    def describe(self) -> str:
        return (f"{self.series} diverged: {WINDOW} logged values in a row (since step {self.began_at}; the last "
                f"{self.last_value:.4g}) are above {FACTOR:g} x its best running mean {self.best:.4g} (step "
                f"{self.best_step})")


@dataclass
class DivergenceWatch:
    """The rule above, over one series; `observe` returns a `Divergence` the one time it fires."""
    series: str
    ema: float | None = None
    best: float | None = None
    best_step: int = 0
    streak: int = 0
    streak_start: int | None = None
    last_step: int | None = None  # the step of the previous logged value
    last_good_step: int | None = None  # the step of the value just before the current streak
    fired: bool = False

    def observe(self, step: int, value: float) -> Divergence | None:
        """Take the value logged at `step`; the divergence, the first time the rule holds."""
        finite = math.isfinite(value)
        far = not finite or (self.best is not None and value > FACTOR * self.best)
        if far:
            if self.streak == 0:
                self.streak_start, self.last_good_step = step, self.last_step
            self.streak += 1
        else:
            self.streak, self.streak_start = 0, None
        if finite:  # after the test: a value is compared with the best of the values before it
            self.ema = value if self.ema is None else self.ema + SMOOTHING * (value - self.ema)
            if self.best is None or self.ema < self.best:
                self.best, self.best_step = self.ema, step
        self.last_step = step
        if self.fired or self.streak < WINDOW:
            return None
        self.fired = True
        return Divergence(self.series, self.streak_start, self.last_good_step, value, self.best, self.best_step, step)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class DivergenceError(UserError, RuntimeError):
    """training.stop_on_divergence stopped the run; the message names the onset and the checkpoint to go back to."""

    exit_code = 3  # as a NaN loss under training.detect_anomaly (config.errors.AnomalyError)


def checkpoint_before(checkpoints: list[Path], step: int | None) -> Path | None:
    """The newest checkpoint folder (step-NNNNNNN, oldest first in `checkpoints`) saved at or before `step`."""
    if step is None:
        return None
    return next((c for c in reversed(checkpoints) if int(c.name.removeprefix("step-")) <= step), None)


def divergence_message(found: Divergence, checkpoint: Path | None, stopping: bool, resume: str | None) -> str:
    """The warning, or (training.stop_on_divergence) the stop message with the command that resumes."""
    began = f"after step {found.last_good_step}" if found.last_good_step is not None else "at the first logged value"
    if checkpoint is not None:
        where, back = f"the last checkpoint before it is {checkpoint}", "resume from it"
    else:
        where, back = ("no checkpoint of this run was saved before it (training.checkpoint_every saves them)",
                       "start again")
    remedy = f"{back} with a lower learning rate or training.max_grad_norm (e.g. 1.0)"
    if not stopping:
        return (f"{found.describe()}; it began {began}, and {where}. Training goes on (training.stop_on_divergence: "
                f"true stops here), but its weights are probably worse than there: {remedy}")
    text = (f"training.stop_on_divergence: {found.describe()}; it began {began}, and {where}. Stopped at step "
            f"{found.detected_at} without saving, so that no better weights are overwritten: {remedy}")
    return text + (f". Resume with:\n  {resume}" if resume else "")
