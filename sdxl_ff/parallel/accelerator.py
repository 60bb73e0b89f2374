"""Where training runs: the device and precision (accelerate's Accelerator), and torch.compile.

The processes, the trained modules and the optimizer have their own modules (distributed.py,
trainables.py, optim.py).
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import InitProcessGroupKwargs

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import Config
from sdxl_ff.parallel.processes import check_launch_engine, wait_timeout

log = logging.getLogger(__name__)


def mixed_precision(use_bf16: bool, on_cpu: bool) -> str:
    """accelerate's mixed_precision for model.use_bf16: bf16 autocast, else fp32 on the CPU and fp16 on a GPU."""
    if use_bf16:
        return "bf16"
    return "no" if on_cpu else "fp16"


def make_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for the configured device and precision (bf16 autocast, fp16 + GradScaler, or fp32)."""
    check_launch_engine(dict(os.environ))
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("device: \"cuda\" was requested but no CUDA device is visible; "
                          "use \"auto\" or \"cpu\", or check the driver (nvidia-smi)")
    on_cpu = cfg.device == "cpu" or not cuda
    precision = mixed_precision(cfg.model.use_bf16, on_cpu)
    # SDXL conditions on text encoder 1's penultimate layer, so its last layer gets no gradient:
    # DDP must be told, or it waits for those gradients forever.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.model.train_text_encoder_1)
    wait = InitProcessGroupKwargs(timeout=wait_timeout(dict(os.environ)))
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=precision, kwargs_handlers=[ddp, wait])
    check_launch_engine({}, accelerator.distributed_type)
    return accelerator


def compile_unet(unet: torch.nn.Module, kwargs: dict) -> torch.nn.Module:
    """torch.compile the UNet (lazy: the first forward pass compiles). Saving must unwrap it (`_orig_mod.` keys)."""
    log.info("torch.compile: UNet with %s (the first steps compile and are slow)", kwargs or "default settings")
    return torch.compile(unet, **kwargs)
