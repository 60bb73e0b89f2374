"""Guards of the update: gradient clipping, and stopping at once on a NaN/Inf loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from accelerate import Accelerator

from sdxl_ff.config.errors import AnomalyError
from sdxl_ff.runtime.wsl import pinned_copies_allowed


def anomaly_message(loss: float, step: int, paths: list[str], last_state: str | None) -> str:
    """What the user needs to find the cause and go on: step, batch files, the state to go back to."""
    files = "\n  - ".join(paths)
    saved = (f"the last good state is {last_state} (left untouched)" if last_state
             else "no state was saved by this run, and nothing was written")
    return (f"training.detect_anomaly: the loss became {loss} at optimizer step {step}; stopped without saving "
            f"so that no good weights are overwritten; {saved}.\nbatch files:\n  - {files}\n"
            f"Try a lower learning rate, max_grad_norm (e.g. 1.0), or check these images.")


class AnomalyWatch:
    """training.detect_anomaly on one process without the host waiting for the device (torchtitan-style): a step's
    micro-batch losses are copied to the host without blocking (pinned memory on CUDA) and read one step later,
    once the next step is queued, or before anything is saved. The run stops as before, naming the bad step, its
    loss and its batch files; only the step after it has run too (its weights are never saved)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._pending: tuple | None = None

    def watch(self, step: int, losses: torch.Tensor, paths: list[list[str]]) -> None:
        """Start copying optimizer step `step`'s micro-batch losses to the host; `check()` reads them."""
        if not self.enabled:
            return
        host, done = losses, None
        if losses.device.type == "cuda":
            host = torch.empty(losses.shape, dtype=losses.dtype, pin_memory=pinned_copies_allowed())
            host.copy_(losses, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self._pending = (step, host, paths, done)

    def check(self, last_state: Callable[[], str | None]) -> None:
        """Raise AnomalyError if the step watched last had a NaN/Inf loss. The host waits only if that step has not
        finished on the device yet (it has, one step later, unless the device is a whole step behind)."""
        if self._pending is None:
            return
        step, host, paths, done = self._pending
        self._pending = None
        if done is not None and not done.query():
            done.synchronize()
        values = host.numpy().tolist()  # host memory the copy has filled: no torch op, no read of the device
        first = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if first is not None:
            raise AnomalyError(anomaly_message(values[first], step, paths[first], last_state()))


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
    norm = accelerator.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)
    # sharded gradients (training.sharding fsdp2) give a DTensor: every process takes part in summing it
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
