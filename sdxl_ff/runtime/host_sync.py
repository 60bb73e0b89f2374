"""Counting what a training step asks of the host: the aten ops it dispatches, and the reads that make the host
wait for the device (host-device syncs).

A sync is counted for: `aten._local_scalar_dense` (`.item()`, `float(t)`, `bool(t)`), `Tensor.tolist()`,
`aten.nonzero` (its output size needs the device), a copy between the host and a CUDA device without
`non_blocking`, `torch.cuda.synchronize()` and `torch.cuda.Event.synchronize()`. On the CPU every tensor lives
on the host, so the count there is what *would* wait on a GPU; tensors that stay on the host on every device
(torch optimizers' step counters, say) are left out with `host_side()`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense.default: "item", aten.nonzero.default: "nonzero"}
COPIES = {aten._to_copy.default, aten.copy_.default}


class HostSyncCounter(TorchDispatchMode):
    """Within `with counter:` count dispatched aten ops (`ops`) and host-device syncs by kind (`syncs`)."""

    def __init__(self, host_side: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.ops = 0
        self.syncs: Counter[str] = Counter()
        self._host_ptrs = {t.data_ptr() for t in host_side}
        self._inside_tolist = 0
        self._paused = False

    def host_side(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors that live on the host whichever device trains: reading them is no sync."""
        self._host_ptrs |= {t.data_ptr() for t in tensors}

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing within: work that stays on the host on every device (the data loader's)."""
        self._paused = True
        try:
            with _disable_current_modes():
                yield
        finally:
            self._paused = False

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        kind = SCALAR_READS.get(func)
        if kind and not self._inside_tolist and args[0].data_ptr() not in self._host_ptrs:
            self.syncs[kind] += 1
        elif func in COPIES and not self._inside_tolist and blocking_transfer(func, args, kwargs):
            self.syncs["blocking copy"] += 1
        return func(*args, **kwargs)

    @contextmanager
    def _patched(self) -> Iterator[None]:
        tolist, synchronize, event_sync = torch.Tensor.tolist, torch.cuda.synchronize, torch.cuda.Event.synchronize
        counter = self

        def counted_tolist(tensor: torch.Tensor):
            if not counter._paused and tensor.data_ptr() not in counter._host_ptrs:
                counter.syncs["tolist"] += 1
            counter._inside_tolist += 1  # its copy to the host is the same sync
            try:
                return tolist(tensor)
            finally:
                counter._inside_tolist -= 1

        def counted(kind: str, function):
            def call(*args, **kwargs):
                if not counter._paused:
                    counter.syncs[kind] += 1
                return function(*args, **kwargs)
            return call

        torch.Tensor.tolist = counted_tolist
        torch.cuda.synchronize = counted("cuda.synchronize", synchronize)
        torch.cuda.Event.synchronize = counted("event.synchronize", event_sync)
        try:
            yield
        finally:
            torch.Tensor.tolist, torch.cuda.synchronize, torch.cuda.Event.synchronize = tolist, synchronize, event_sync

    def __enter__(self):
        self._patches = self._patched()
        self._patches.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.__exit__(None, None, None)


def blocking_transfer(func, args: tuple, kwargs: dict) -> bool:
    """A copy between the host and a CUDA device that the host waits for (no `non_blocking`)."""
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        devices = {dst.device.type, src.device.type}
    else:
        src = args[0]
        target = kwargs.get("device") or src.device
        non_blocking = kwargs.get("non_blocking", False)
        devices = {src.device.type, torch.device(target).type}
    return not non_blocking and devices == {"cpu", "cuda"}


def optimizer_step_counters(optimizer) -> list[torch.Tensor]:
    """The step counters a torch optimizer keeps on the host (non-fused, non-capturable), and learning rates held
    as host tensors (torchao's): reading them is no sync.

    Takes a PerParamOptimizer (sdxl_ff/optim/per_param.py) too: its inner optimizers' counters.
    """
    inner = getattr(optimizer, "optimizers", None)
    optimizers = list(inner.values()) if isinstance(inner, dict) else [optimizer]
    steps = [state["step"] for opt in optimizers for state in getattr(opt, "state", {}).values()
             if isinstance(state.get("step"), torch.Tensor) and state["step"].device.type == "cpu"]
    rates = [group["lr"] for group in optimizer.param_groups
             if isinstance(group["lr"], torch.Tensor) and group["lr"].device.type == "cpu"]
    return steps + rates
