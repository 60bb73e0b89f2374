"""Guards of the update: gradient clipping, and stopping at once on a NaN/Inf loss."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from .errors import UserError


class AnomalyError(UserError, RuntimeError):
    """A non-finite loss stopped the run; the message names the step, the files and the last good state."""

    exit_code = 3


def anomaly_message(loss: float, step: int, paths: list[str], last_state: str | None) -> str:
    """What the user needs to find the cause and go on: step, batch files, the state to go back to."""
    files = "\n  - ".join(paths)
    saved = (f"the last good state is {last_state} (left untouched)" if last_state
             else "no state was saved by this run, and nothing was written")
    return (f"training.detect_anomaly: the loss became {loss} at optimizer step {step}; stopped without saving "
            f"so that no good weights are overwritten; {saved}.\nbatch files:\n  - {files}\n"
            f"Try a lower learning rate, max_grad_norm (e.g. 1.0), or check these images.")


def clip_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float | None,
                   measure: bool = False) -> float | None:
    """Clip the global gradient norm to `max_norm` (after unscaling fp16 gradients); return the norm before.

    With `max_norm` None nothing is clipped; the norm is still measured (and returned) when `measure`.
    """
    norm = clip_gradients_async(accelerator, params, max_norm, measure)
    return None if norm is None else float(norm)


def clip_gradients_async(accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float | None,
                         measure: bool = False) -> torch.Tensor | None:
    """`clip_gradients` without waiting for the device: the norm stays a tensor until it is logged."""
    if max_norm is None and not measure:
        return None
    return accelerator.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)
