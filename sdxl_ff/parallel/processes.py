"""Several processes (accelerate launch): the launch engine, how long processes wait for each other, the shared seed,
and how the trained modules and optimizer are wrapped for them."""

from __future__ import annotations

import datetime
import logging
import os
import secrets
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import Config
from sdxl_ff.model.trainables import Trainables
from sdxl_ff.optim.per_param import PerParamOptimizer
from sdxl_ff.parallel.launch import check_launch_environment, engine_refused

log = logging.getLogger(__name__)

DATA_PARALLEL = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


def check_launch_engine(environ: dict[str, str], distributed_type: DistributedType | None = None) -> None:
    """Refuse accelerate set-ups other than plain data parallelism, before they fail in their own words."""
    check_launch_environment(environ)
    if distributed_type is not None and distributed_type not in DATA_PARALLEL:
        raise engine_refused(distributed_type.value)


# The other processes wait while the main one builds caches, saves an SDXL checkpoint, renders eval images
# or exports: NCCL's default of 10 minutes is too short for that on a slow disk.
WAIT_TIMEOUT_ENV = "SDXL_FF_WAIT_TIMEOUT_MINUTES"
DEFAULT_WAIT_TIMEOUT = datetime.timedelta(hours=2)


def wait_timeout(environ: dict[str, str]) -> datetime.timedelta:
    """How long a process waits for the others (collectives and barriers): 2 hours, or $SDXL_FF_WAIT_TIMEOUT_MINUTES."""
    value = environ.get(WAIT_TIMEOUT_ENV)
    if not value:
        return DEFAULT_WAIT_TIMEOUT
    try:
        minutes = float(value)
    except ValueError:
        minutes = 0
    if minutes <= 0:
        raise ConfigError(f"{WAIT_TIMEOUT_ENV}={value!r}: give the wait timeout in minutes, a number above 0 "
                          f"(the default is {DEFAULT_WAIT_TIMEOUT.total_seconds() / 60:g})")
    return datetime.timedelta(minutes=minutes)


def prepare(accelerator: Accelerator, trainables: Trainables, optimizer) -> tuple[list[torch.nn.Module], Any]:
    """Let accelerate wrap the trained modules (and a regular optimizer) for devices and processes (whole modules:
    FSDP2 shards them in place instead, strategy.py)."""
    # stepped in the backward pass (or one optimizer per tensor): accelerate's wrapper would step it again
    per_param = isinstance(optimizer, PerParamOptimizer) or getattr(optimizer, "fused", False) is True
    if per_param and accelerator.mixed_precision == "fp16":
        raise ConfigError("model.full_bf16 / training.fused_backward cannot run with fp16 and its GradScaler; "
                          "set model.use_bf16 to true")
    if per_param and optimizer.fused and accelerator.num_processes > 1:
        raise ConfigError("training.fused_backward cannot run on several processes (gradients are all-reduced "
                          "after the backward pass); set it to false for multi-GPU training")
    prepared = accelerator.prepare(*trainables.modules.values(), *([] if per_param else [optimizer]))
    prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
    if per_param:
        return prepared, optimizer
    return prepared[:-1], prepared[-1]


def process_group_timeout() -> datetime.timedelta | None:
    """The wait timeout of the default process group as torch holds it (None when it cannot be read)."""
    try:
        group = torch.distributed.distributed_c10d._get_default_group()
        device = torch.distributed.distributed_c10d._get_pg_default_device(group)
        return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None


# torchrun's agent SIGKILLs the workers this many seconds after forwarding Ctrl-C / SIGTERM (default 30)
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
SAFE_SHUTDOWN_SECONDS = 900  # a full SDXL checkpoint (weights, optimizer, EMA) on a slow disk


def shutdown_advice(environ: dict[str, str], num_processes: int) -> str | None:
    """A hint to raise torchrun's shutdown grace period when several processes run with the short default."""
    if num_processes == 1:
        return None
    try:
        seconds = float(environ.get(SHUTDOWN_TIMEOUT_ENV) or 30)
    except ValueError:
        seconds = 30
    if seconds >= SAFE_SHUTDOWN_SECONDS:
        return None
    return (f"{SHUTDOWN_TIMEOUT_ENV} is {seconds:g} s: after Ctrl-C or SIGTERM accelerate launch kills the "
            f"processes that long after forwarding the signal, which can cut the final checkpoint save. Launch with "
            f"{SHUTDOWN_TIMEOUT_ENV}={SAFE_SHUTDOWN_SECONDS} accelerate launch ...")


def describe_processes(accelerator) -> None:
    """Log, once, how the processes run together and what to set for a safe Ctrl-C."""
    if accelerator.num_processes == 1:
        return
    timeout = process_group_timeout()
    log.info("%d processes (%s); a wait for the main process times out after %s (%s)", accelerator.num_processes,
             accelerator.state.backend, timeout if timeout is not None else "the configured time", WAIT_TIMEOUT_ENV)
    advice = shutdown_advice(dict(os.environ), accelerator.num_processes)
    if advice and accelerator.is_main_process:
        log.warning(advice)


def shared_seed(cfg: Config, accelerator) -> int:
    """The configured seed, or a fresh random one (null or 0) drawn by the main process and sent to the others.

    Every process must hold the same seed: it orders the data that the processes share out, and
    seeds the noise and the rounding of the (identical) weights.
    """
    seed = cfg.training.seed
    if seed:
        log.info("seed: %d", seed)
        return seed
    drawn = [secrets.randbelow(2**31 - 1) + 1]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn, from_process=0)
    seed = drawn[0]
    log.info("seed: %d (random; set training.seed=%d to repeat this run)", seed, seed)
    return seed
